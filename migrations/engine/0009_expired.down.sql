-- Expired commands were not applied: without the status they count as rejected.
UPDATE loom_commands SET status = 'rejected' WHERE status = 'expired';
ALTER TABLE loom_commands DROP CONSTRAINT IF EXISTS loom_commands_status_check;
ALTER TABLE loom_commands ADD CONSTRAINT loom_commands_status_check
    CHECK (status IN ('applied', 'rejected', 'retrying', 'parked', 'conflict'));
