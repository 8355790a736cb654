-- Catalogue read by GetItem, and the job table the worker pool consumes.
-- Written for both MySQL 8 and MariaDB >= 10.6.

CREATE TABLE IF NOT EXISTS items (
    id          BIGINT       NOT NULL PRIMARY KEY,
    name        VARCHAR(128) NOT NULL,
    price_cents BIGINT       NOT NULL,
    description VARCHAR(512) NOT NULL
) ENGINE = InnoDB;

-- payload is binary on purpose: a "poison" row whose bytes cannot be decoded
-- must be storable, so the worker can meet it (and dead-letter it).
CREATE TABLE IF NOT EXISTS jobs (
    id          BIGINT        NOT NULL AUTO_INCREMENT PRIMARY KEY,
    status      VARCHAR(16)   NOT NULL DEFAULT 'pending',
    attempts    INT UNSIGNED  NOT NULL DEFAULT 0,
    claimed_by  VARCHAR(128)  NULL,
    claimed_at  TIMESTAMP(3)  NULL,
    payload     MEDIUMBLOB    NOT NULL,
    result      TEXT          NULL,
    last_error  TEXT          NULL,
    created_at  TIMESTAMP(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at  TIMESTAMP(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    KEY jobs_status_id (status, id)
) ENGINE = InnoDB;
