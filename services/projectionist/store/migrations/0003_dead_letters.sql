-- Poison events parked by the `park` policy. Later events of the same
-- aggregate are parked behind the first one (reason 'blocked'), so a read
-- model never sees an aggregate's events out of order. Nothing is deleted:
-- `projectionist dead-letters retry|discard` only changes the status.
CREATE TABLE dead_letters (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    projection_name   text NOT NULL,
    event_id          uuid NOT NULL,
    global_position   bigint NOT NULL,
    aggregate_id      text NOT NULL,
    aggregate_version bigint NOT NULL,
    partition_hash    bigint NOT NULL,
    event_type        text NOT NULL,
    -- 'failed': the projection raised on it; 'blocked': an earlier event of the
    -- same aggregate is parked.
    reason            text NOT NULL CHECK (reason IN ('failed', 'blocked')),
    status            text NOT NULL DEFAULT 'parked'
                      CHECK (status IN ('parked', 'retry', 'resolved', 'discarded')),
    attempts          integer NOT NULL DEFAULT 0,
    error             text,
    traceback         text,
    parked_at         timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (projection_name, event_id)
);

CREATE INDEX dead_letters_open_idx ON dead_letters (projection_name, aggregate_id, aggregate_version)
    WHERE status IN ('parked', 'retry');
