-- Run by the MySQL/MariaDB server at start (--init-file natively,
-- /docker-entrypoint-initdb.d in compose): the lab's database and user.
-- service-b creates per-test databases itself, so `lab` gets global rights.
CREATE DATABASE IF NOT EXISTS lab;
CREATE USER IF NOT EXISTS 'lab'@'%' IDENTIFIED BY 'lab';
GRANT ALL PRIVILEGES ON *.* TO 'lab'@'%';
