-- What the console (docs/console.md) asks of loom_commands, at a million rows.
--
-- causation_id: the command that published this one through the outbox
-- (its ce_causationid), so a command's story can follow its follow-ups.
ALTER TABLE loom_commands ADD COLUMN causation_id TEXT;

-- The command list, newest first, paged by (received_at, message_id,
-- consumer): received_at is set once, so a page boundary never moves.
CREATE INDEX loom_commands_by_received ON loom_commands (received_at, message_id, consumer);
-- Filters that pick few rows out of many: a key (stream), a type.
CREATE INDEX loom_commands_by_stream ON loom_commands (stream_id, received_at)
    WHERE stream_id IS NOT NULL;
CREATE INDEX loom_commands_by_type ON loom_commands (type, received_at);
-- A story: the commands of one ray, and the follow-ups of a command.
CREATE INDEX loom_commands_by_ray ON loom_commands (ray_id) WHERE ray_id IS NOT NULL;
CREATE INDEX loom_commands_by_causation ON loom_commands (causation_id)
    WHERE causation_id IS NOT NULL;
-- The events a command emitted.
CREATE INDEX loom_events_by_causation ON loom_events (causation_id)
    WHERE causation_id IS NOT NULL;
