ALTER TABLE loom_commands DROP COLUMN request;
ALTER TABLE loom_nodes DROP COLUMN consumers;
