-- Every message a worker takes ends visible (docs/operations.md, "What
-- happens to a message"). Plain SQL for PostgreSQL 15 and CockroachDB.

-- A command that reused the id of another, with another type or data, is
-- recorded as a "conflict" row of its own, next to the command that holds
-- the id (conflict_of).
ALTER TABLE loom_commands DROP CONSTRAINT IF EXISTS loom_commands_status_check;
ALTER TABLE loom_commands DROP CONSTRAINT IF EXISTS check_status;
ALTER TABLE loom_commands ADD CONSTRAINT loom_commands_status_check
    CHECK (status IN ('applied', 'rejected', 'retrying', 'parked', 'conflict'));

-- The CloudEvents source of the command, and a SHA-256 of its type and data:
-- a resend of the same command is skipped, another command with its id is a
-- conflict.
ALTER TABLE loom_commands ADD COLUMN source TEXT;
ALTER TABLE loom_commands ADD COLUMN digest TEXT;
-- The raw Kafka key, kept like headers and payload while a command is not
-- applied (the key may be bytes that are not text).
ALTER TABLE loom_commands ADD COLUMN msg_key BYTEA;
-- For a conflict row: the id it tried to reuse.
ALTER TABLE loom_commands ADD COLUMN conflict_of TEXT;
CREATE INDEX loom_commands_conflicts ON loom_commands (conflict_of)
    WHERE conflict_of IS NOT NULL;
