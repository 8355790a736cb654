-- A failed attempt of the bounded worker is retried with backoff: the job
-- goes back to pending and is not claimed again before not_before.
ALTER TABLE jobs ADD COLUMN not_before TIMESTAMP(3) NULL;
