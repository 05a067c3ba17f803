-- Safe rescaling (N -> M partitions) without replaying from position 0.
--
-- When a projection's partition count changes, the old group's final
-- checkpoints become "skip marks": an event e was already applied iff, for
-- some recorded layer L, (e.transaction_id, e.global_position) is at or
-- below L's mark for partition (e.partition_hash % L.total_workers). The new
-- group starts from the highest position below which every event is known to
-- be applied, and filters out marked events in SQL until it has passed every
-- mark. Layers stack, so 4 -> 3 -> 6 works even when the 3-group had not yet
-- passed the 4-group's marks.
ALTER TABLE projection_groups ADD COLUMN generation integer NOT NULL DEFAULT 1;

CREATE TABLE projection_skip_marks (
    projection_name      text NOT NULL,
    generation           integer NOT NULL,
    total_workers        integer NOT NULL CHECK (total_workers > 0),
    worker_id            integer NOT NULL CHECK (worker_id >= 0 AND worker_id < total_workers),
    last_transaction_id  xid8 NOT NULL,
    last_global_position bigint NOT NULL,
    PRIMARY KEY (projection_name, generation, worker_id)
);
