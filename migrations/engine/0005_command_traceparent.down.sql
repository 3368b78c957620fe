ALTER TABLE loom_commands DROP COLUMN traceparent;
