-- Engine tables (DESIGN.md section 7). Plain SQL that runs on PostgreSQL 15
-- and CockroachDB: no triggers, no PL/pgSQL, no advisory locks.

-- One row per (consumer, message id): the dedup record and the command's status.
-- It is written in the same transaction as the handler's changes, so a
-- redelivered message finds its row and is skipped.
CREATE TABLE loom_commands (
    consumer        TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    type            TEXT NOT NULL,
    stream_id       TEXT,
    topic           TEXT NOT NULL,
    kafka_partition INT NOT NULL,
    kafka_offset    BIGINT NOT NULL,
    status          TEXT NOT NULL
                    CHECK (status IN ('applied', 'rejected', 'retrying', 'parked')),
    attempts        INT NOT NULL DEFAULT 1,
    last_error      TEXT,
    result          JSONB,
    ray_id          TEXT,
    -- kept only while a command is not applied, so it can be replayed
    headers         JSONB,
    payload         BYTEA,
    received_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX loom_commands_by_message ON loom_commands (message_id);
CREATE INDEX loom_commands_open ON loom_commands (status, updated_at)
    WHERE status <> 'applied';

-- The append-only event log. The primary key on (stream_id, version) is the
-- optimistic-concurrency check: two writers of one version cannot both commit.
CREATE TABLE loom_events (
    stream_id    TEXT NOT NULL,
    version      BIGINT NOT NULL CHECK (version > 0),
    event_id     TEXT NOT NULL,
    type         TEXT NOT NULL,
    data         JSONB NOT NULL,
    ray_id       TEXT,
    causation_id TEXT,
    recorded_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, version)
);

-- Messages a handler publishes, written in its transaction; the outbox relay
-- sends them to Kafka in id order and deletes them.
CREATE TABLE loom_outbox (
    id         BIGSERIAL PRIMARY KEY,
    topic      TEXT NOT NULL,
    msg_key    TEXT,
    headers    JSONB NOT NULL DEFAULT '{}',
    payload    BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Leadership of periodic jobs: one row per job, held until expires_at.
CREATE TABLE loom_leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    acquired_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  TIMESTAMPTZ NOT NULL
);

-- Every Loom process, with its last heartbeat.
CREATE TABLE loom_nodes (
    id             UUID PRIMARY KEY,
    role           TEXT NOT NULL,
    url            TEXT,
    site           TEXT NOT NULL,
    version        TEXT NOT NULL,
    started_at     TIMESTAMPTZ NOT NULL,
    last_heartbeat TIMESTAMPTZ NOT NULL
);
