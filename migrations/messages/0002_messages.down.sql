DROP INDEX IF EXISTS loom_events_by_type_time;
DROP TABLE IF EXISTS messages;
