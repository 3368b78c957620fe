-- Runs of oneshot jobs (`loom run NAME`, loom/task.h): one row per job,
-- like loom_schema_migrations for migrations. A job whose row says 'done'
-- is not run again; 'running' keeps a second run from starting meanwhile.
CREATE TABLE loom_oneshot_runs (
    name        TEXT PRIMARY KEY,
    status      TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    node        TEXT NOT NULL,
    version     TEXT NOT NULL,
    attempts    INT NOT NULL DEFAULT 1,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at TIMESTAMPTZ,
    error       TEXT
);
