DROP INDEX IF EXISTS loom_commands_conflicts;
DELETE FROM loom_commands WHERE status = 'conflict';
ALTER TABLE loom_commands DROP COLUMN IF EXISTS conflict_of;
ALTER TABLE loom_commands DROP COLUMN IF EXISTS msg_key;
ALTER TABLE loom_commands DROP COLUMN IF EXISTS digest;
ALTER TABLE loom_commands DROP COLUMN IF EXISTS source;
ALTER TABLE loom_commands DROP CONSTRAINT IF EXISTS loom_commands_status_check;
ALTER TABLE loom_commands ADD CONSTRAINT loom_commands_status_check
    CHECK (status IN ('applied', 'rejected', 'retrying', 'parked'));
