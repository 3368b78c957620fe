DROP TABLE IF EXISTS loom_nodes;
DROP TABLE IF EXISTS loom_leases;
DROP TABLE IF EXISTS loom_outbox;
DROP TABLE IF EXISTS loom_events;
DROP TABLE IF EXISTS loom_commands;
