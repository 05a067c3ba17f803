-- Payloads and metadata are kept as the JSON text the writer sent (json), not
-- in PostgreSQL's parsed form (jsonb).
--
-- The log is append-only and read whole, by workers that decode the text
-- themselves, so the parsed form bought nothing and cost on both sides: every
-- append parsed each payload into it, and every read turned each row back into
-- text. `python -m bench.payload_type` times both on the server: a worker's
-- read went from 1.7 to 0.7 microseconds a row, an insert from 11.5 to 10.5,
-- and a 200-byte payload takes 237 bytes instead of 257. Server CPU is what N
-- workers share. Payloads also keep the key order the writer gave them.
--
-- Ad hoc SQL keeps working: json has the -> and ->> operators, and
-- payload::jsonb gives the rest (an index needs the same expression).
--
-- The type change rewrites the table and its indexes under an ACCESS
-- EXCLUSIVE lock: appends and reads wait until it ends, so on a large store
-- run `projectionist migrate` in a quiet window.
ALTER TABLE events
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN metadata DROP DEFAULT,
    ALTER COLUMN metadata TYPE json USING metadata::json,
    ALTER COLUMN metadata SET DEFAULT '{}'::json;
