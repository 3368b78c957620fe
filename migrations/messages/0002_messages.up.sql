-- The messages service (SERVICES.md section 1): temporary storage of
-- CloudEvents. `event` is the event in the JSON event format as it was put;
-- retention is measured from stored_at.
CREATE TABLE messages (
    id        TEXT PRIMARY KEY,
    stored_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    event     TEXT NOT NULL
);
CREATE INDEX messages_by_stored_at ON messages (stored_at);

-- Replays read a projection's events in the order they were recorded.
CREATE INDEX loom_events_by_type_time ON loom_events (type, recorded_at);
