-- A command whose ce_deadline had passed when a worker first took it is not
-- applied: it is recorded as "expired" (docs/operations.md).
ALTER TABLE loom_commands DROP CONSTRAINT IF EXISTS loom_commands_status_check;
ALTER TABLE loom_commands ADD CONSTRAINT loom_commands_status_check
    CHECK (status IN ('applied', 'rejected', 'retrying', 'parked', 'conflict', 'expired'));
