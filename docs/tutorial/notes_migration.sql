CREATE TABLE tutorial_notes (
    id         TEXT PRIMARY KEY,
    text       TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
