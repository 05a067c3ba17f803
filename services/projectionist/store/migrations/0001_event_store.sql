-- The event store and the projection checkpoints.
--
-- Ordering: global_position comes from an identity sequence, and sequence
-- order is NOT commit order: a transaction can take position 10, stay open,
-- and commit after position 11 is already visible. A reader that moved its
-- checkpoint past 11 would never see 10. So every row also records the id of
-- the transaction that wrote it (transaction_id, xid8), and readers only take
-- rows whose transaction is older than the oldest transaction still running
-- (pg_snapshot_xmin). Those transactions have all ended, so nothing can ever
-- appear below the read position. Readers order by
-- (transaction_id, global_position) and keep both in their checkpoint.
CREATE TABLE events (
    global_position   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id    xid8 NOT NULL DEFAULT pg_current_xact_id(),
    event_id          uuid NOT NULL UNIQUE,
    aggregate_id      text NOT NULL,
    aggregate_version bigint NOT NULL CHECK (aggregate_version > 0),
    -- FNV-1a 32-bit hash of aggregate_id, computed at append time so the
    -- partition filter runs in SQL on a stored column (see reader.py).
    partition_hash    bigint NOT NULL CHECK (partition_hash BETWEEN 0 AND 4294967295),
    event_type        text NOT NULL,
    payload           jsonb NOT NULL,
    -- correlation_id, causation_id, traceparent, tracestate, and user keys.
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- The optimistic-concurrency guard: two appends that computed the same
    -- next version collide here, and the loser gets ConcurrencyError.
    UNIQUE (aggregate_id, aggregate_version)
);

-- The gap-safe read path walks this index in order.
CREATE INDEX events_transaction_position_idx ON events (transaction_id, global_position);

-- One row per (projection, partition count, worker). total_workers is part of
-- the key so checkpoints of an old partitioning are never reused under a new
-- modulus (reusing them is how the upstream library skips events on rescale).
-- last_global_position keeps the upstream example's column name so its lag query still works.
CREATE TABLE projection_checkpoints (
    projection_name      text NOT NULL,
    total_workers        integer NOT NULL CHECK (total_workers > 0),
    worker_id            integer NOT NULL CHECK (worker_id >= 0 AND worker_id < total_workers),
    last_transaction_id  xid8 NOT NULL DEFAULT '0'::xid8,
    last_global_position bigint NOT NULL DEFAULT 0,
    events_processed     bigint NOT NULL DEFAULT 0,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection_name, total_workers, worker_id)
);

-- The partition count each projection's worker group uses. A worker started
-- with a different TOTAL_WORKERS is refused rather than silently re-partitioning.
CREATE TABLE projection_groups (
    projection_name text PRIMARY KEY,
    total_workers   integer NOT NULL CHECK (total_workers > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
