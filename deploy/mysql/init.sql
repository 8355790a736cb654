-- Run by the MySQL/MariaDB server at start (--init-file natively, at every
-- start; /docker-entrypoint-initdb.d in compose, once): the lab's database
-- and `lab`, the one user the services and labctl connect as. `labctl up`
-- puts each lab's own password in place of 'lab' (<state-dir>/mysql.password);
-- compose keeps this default.
--
-- `lab` may use the `lab` database and nothing else: read and write its
-- rows (`labctl bench jobs`'s ANALYZE TABLE needs no more) and run B's
-- migrations (CREATE, ALTER, INDEX). No global privilege, no access to
-- `mysql.*` or to another database, no GRANT OPTION; no service connects
-- as root.
CREATE DATABASE IF NOT EXISTS lab;
CREATE USER IF NOT EXISTS 'lab'@'%' IDENTIFIED BY 'lab';
-- A data directory made by an older lab granted `lab` everything on *.*.
REVOKE ALL PRIVILEGES, GRANT OPTION FROM 'lab'@'%';
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX ON lab.* TO 'lab'@'%';
