-- The W3C traceparent of the request that submitted the job (NULL for rows
-- written straight into the table): the worker's span for the job continues
-- that trace, and the call to partner-api carries it.
ALTER TABLE jobs ADD COLUMN traceparent VARCHAR(55) NULL;
