-- The ledger's read model: one row per account. The events of an account
-- (stream "account-<id>", in loom_events) are the record; `version` is the
-- stream's version, so a command appends with the version it read.
CREATE TABLE ledger_accounts (
    id      TEXT PRIMARY KEY,
    balance BIGINT NOT NULL CHECK (balance >= 0),
    version BIGINT NOT NULL
);
