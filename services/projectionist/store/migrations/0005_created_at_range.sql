-- created_at within the years Python's datetime holds (1 to 9999), a day
-- inside them at each end, so that a session in any real time zone (offsets
-- within a day) can load it; workers read in UTC.
--
-- The store always writes the server's clock, but timestamptz also takes
-- 'infinity' and years up to 294276, which a raw-SQL writer may send; every
-- Python reader (the workers, the API) then failed to load that row. Such a
-- row is now refused when it is written, with this constraint's name.
--
-- NOT VALID: the rows already stored are not scanned, so the migration takes
-- its ACCESS EXCLUSIVE lock only for a moment. A worker that meets an old row
-- of that kind hands it to the poison policy (see store/lenient_timestamps.py). To find
-- them, or to have the constraint cover them too once fixed:
--   SELECT global_position FROM events
--    WHERE NOT (created_at >= '0001-01-02 00:00:00+00' AND created_at < '9999-12-31 00:00:00+00');
--   ALTER TABLE events VALIDATE CONSTRAINT events_created_at_in_python_range;
-- (VALIDATE scans under a lock that lets appends and reads go on.)
--
-- The lock is brief, but waiting for it behind a long query would queue
-- every append and read behind this migration: give up after 10 s instead
-- (migrate then says so) and let the operator run it again.
SET LOCAL lock_timeout = '10s';
ALTER TABLE events
    ADD CONSTRAINT events_created_at_in_python_range
    CHECK (created_at >= '0001-01-02 00:00:00+00' AND created_at < '9999-12-31 00:00:00+00') NOT VALID;
