DROP INDEX loom_events_by_causation;
DROP INDEX loom_commands_by_causation;
DROP INDEX loom_commands_by_ray;
DROP INDEX loom_commands_by_type;
DROP INDEX loom_commands_by_stream;
DROP INDEX loom_commands_by_received;
ALTER TABLE loom_commands DROP COLUMN causation_id;
