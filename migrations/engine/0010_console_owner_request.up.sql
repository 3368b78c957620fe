-- The console (docs/console.md): each node publishes, with its heartbeat,
-- the partitions its consumers own, their lag and the rates of its consumers;
-- a command published by the gateway keeps the HTTP request that made it.
ALTER TABLE loom_nodes ADD COLUMN consumers JSONB;
ALTER TABLE loom_commands ADD COLUMN request JSONB;
