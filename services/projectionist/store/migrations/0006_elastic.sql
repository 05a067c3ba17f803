-- Elastic mode: member numbers, and each projection's lag as one SQL call.
--
-- An elastic worker joins its projection's group by taking a session
-- advisory lock keyed (hashtext('<projection>/<partitions>/members'),
-- member number); the members are whoever holds such a lock. Numbers come
-- from this sequence, so they grow in join order: the fair share ranks
-- members by number, and a member that joins always ranks last. A join then
-- only takes partitions from the members already there, and a leave only
-- hands the leaver's partitions out (see consume/membership.py).
CREATE SEQUENCE projection_member_numbers AS integer MINVALUE 1 CYCLE;

-- projectionist_lag(projection, cap, busy_samples, busy_interval): how far
-- behind a projection is, from the store alone, so it works with no worker
-- running (an autoscaler that reads worker metrics sees nothing at zero
-- replicas, and KEDA's Prometheus scaler reads a missing series as 0). One
-- row, always:
--   partitions    the group's partition count (0 before any worker created it:
--                 then every event of the store counts as unapplied)
--   events_behind events after the checkpoints, at most cap per partition
--   lag_seconds   age of the oldest unapplied event (database clock), 0 when caught up
--   members       elastic members of the group (sessions holding a member lock)
--   busy_members  how many of them are inside a transaction (a batch), on
--                 average over busy_samples looks busy_interval seconds apart:
--                 every member wakes at every append's NOTIFY, so a single
--                 look catches them all busy or all idle. 10 looks take 0.2 s,
--                 asleep (pg_sleep), and hold no transaction id.
-- Events a retired group already applied (skip marks, after a rescale) are
-- not lag. Each partition is counted by a statement of its own with the
-- partition's numbers as literals, so that its partition index, when valid
-- and the table has statistics, serves the count: at most cap entries a
-- partition. Without the index the count walks cap * partitions rows of the
-- main index after the checkpoint (a lower bound past about cap), as
-- consume/lag.py does for the metrics. docs/design/lag.md has the details;
-- tests/test_elastic_lag.py checks the two agree.
CREATE FUNCTION projectionist_lag(
    projection text,
    cap integer DEFAULT 10000,
    busy_samples integer DEFAULT 1,
    busy_interval double precision DEFAULT 0.02
)
RETURNS TABLE (
    partitions integer,
    events_behind bigint,
    lag_seconds double precision,
    members integer,
    busy_members double precision
)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    total integer;
    skip text;
    analyzed boolean;
    k integer;
    tx xid8;
    pos bigint;
    after text;
    mine text;
    n bigint;
    first_at timestamptz;
    behind bigint := 0;
    oldest timestamptz;
    member_key bigint;
    member_count integer;
    busy double precision := 0;
    look integer;
BEGIN
    IF cap IS NULL OR cap < 1 THEN
        RAISE EXCEPTION 'projectionist_lag: cap must be at least 1, not %', cap;
    END IF;
    IF busy_samples IS NULL OR busy_samples < 1 OR busy_samples > 100 THEN
        RAISE EXCEPTION 'projectionist_lag: busy_samples must be between 1 and 100, not %', busy_samples;
    END IF;
    SELECT g.total_workers INTO total FROM projection_groups g WHERE g.projection_name = projection;
    IF total IS NULL THEN
        -- No group yet: nothing was applied, every event is behind.
        SELECT count(*), min(w.created_at) INTO n, first_at
        FROM (SELECT e.created_at FROM events e
              ORDER BY e.transaction_id, e.global_position LIMIT cap) w;
        RETURN QUERY SELECT 0, n,
            greatest(coalesce(extract(epoch FROM clock_timestamp()
                - CASE WHEN isfinite(first_at) THEN first_at END), 0), 0)::float8, 0, 0::float8;
        RETURN;
    END IF;
    SELECT string_agg(format(
               '(e.partition_hash %% %s = %s AND (e.transaction_id, e.global_position) <= (%L::xid8, %s))',
               m.total_workers, m.worker_id, m.last_transaction_id, m.last_global_position), ' OR ')
      INTO skip
      FROM projection_skip_marks m WHERE m.projection_name = projection;
    -- Without statistics the planner gives the plain partition predicate a
    -- plan that sorts the table's remainder (docs/design/read-path.md).
    SELECT EXISTS (SELECT 1 FROM pg_stats s
                   JOIN pg_class t ON t.relname = s.tablename
                   JOIN pg_namespace ns ON ns.oid = t.relnamespace AND ns.nspname = s.schemaname
                   WHERE t.oid = 'events'::regclass AND s.attname = 'transaction_id')
      INTO analyzed;
    FOR k IN 0 .. total - 1 LOOP
        SELECT c.last_transaction_id, c.last_global_position INTO tx, pos
          FROM projection_checkpoints c
         WHERE c.projection_name = projection AND c.total_workers = total AND c.worker_id = k;
        after := format('(e.transaction_id, e.global_position) > (%L::xid8, %s)',
                        coalesce(tx, '0'::xid8), coalesce(pos, 0));
        IF skip IS NOT NULL THEN
            after := after || ' AND NOT (' || skip || ')';
        END IF;
        IF total = 1 OR (analyzed AND EXISTS (
                SELECT 1 FROM pg_index i
                 WHERE i.indexrelid = to_regclass(format('events_partition_%s_%s_idx', total, k))
                   AND i.indrelid = 'events'::regclass AND i.indisvalid AND i.indisready)) THEN
            mine := CASE WHEN total = 1 THEN 'true' ELSE format('e.partition_hash %% %s = %s', total, k) END;
            EXECUTE format(
                'SELECT (SELECT count(*) FROM (SELECT FROM events e WHERE %1$s AND %2$s'
                '        ORDER BY e.transaction_id, e.global_position LIMIT %3$s) w),'
                '       (SELECT e.created_at FROM events e WHERE %1$s AND %2$s'
                '        ORDER BY e.transaction_id, e.global_position LIMIT 1)',
                mine, after, cap)
              INTO n, first_at;
        ELSE
            EXECUTE format(
                'SELECT count(*) FILTER (WHERE w.partition_hash %% %1$s = %2$s),'
                '       min(w.created_at) FILTER (WHERE w.partition_hash %% %1$s = %2$s)'
                '  FROM (SELECT e.partition_hash, e.created_at FROM events e WHERE %3$s'
                '        ORDER BY e.transaction_id, e.global_position LIMIT %4$s) w',
                total, k, after, cap::bigint * total)
              INTO n, first_at;
        END IF;
        behind := behind + n;
        IF isfinite(first_at) AND (oldest IS NULL OR first_at < oldest) THEN
            oldest := first_at;
        END IF;
    END LOOP;
    member_key := hashtext(projection || '/' || total || '/members')::bigint & 4294967295;
    FOR look IN 1 .. busy_samples LOOP
        IF look > 1 THEN
            PERFORM pg_sleep(busy_interval);
        END IF;
        WITH locks AS MATERIALIZED (
            SELECT l.locktype, l.pid, l.classid, l.objsubid, l.granted, l.database FROM pg_locks l
        ), member AS (
            SELECT l.pid FROM locks l
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
               AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
               AND l.classid::bigint = member_key
        )
        SELECT count(*)::int,
               -- A session inside a transaction holds its virtual transaction id's lock.
               count(*) FILTER (WHERE EXISTS (SELECT 1 FROM locks v
                                               WHERE v.locktype = 'virtualxid' AND v.pid = m.pid))
          INTO member_count, n
          FROM member m;
        busy := busy + n;
    END LOOP;
    RETURN QUERY SELECT total, behind,
           greatest(coalesce(extract(epoch FROM clock_timestamp() - oldest), 0), 0)::float8,
           member_count, busy / busy_samples;
END
$$;

COMMENT ON FUNCTION projectionist_lag(text, integer, integer, double precision) IS
    'How far behind a projection is: events behind (capped per partition), the age of the oldest '
    'unapplied event, and its elastic members. Works with no worker running. See docs/concepts/elastic.md.';
