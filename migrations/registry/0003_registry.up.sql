-- The registry service (SERVICES.md section 2): service definitions and
-- service instances. Nodes are the engine's loom_nodes.

-- A definition is stored whole as it was put (it is replaced whole).
CREATE TABLE registry_definitions (
    id         TEXT PRIMARY KEY,
    definition JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per instance url. id is derived from the url ("inst-" + 24 hex
-- digits of its SHA-256); slug is the caller that registered it first and
-- never changes. seq is the listing's pagination key: unique, assigned at
-- insert and never updated, so a cursor stays valid while rows are added.
-- status_checked_at orders the health probe's status commands: an older
-- probe result never overwrites a newer one.
CREATE TABLE registry_instances (
    id                TEXT PRIMARY KEY,
    seq               BIGSERIAL NOT NULL UNIQUE,
    url               TEXT NOT NULL UNIQUE,
    host              TEXT NOT NULL,
    port              INT NOT NULL CHECK (port BETWEEN 1 AND 65535),
    slug              TEXT NOT NULL,
    deployment_id     TEXT,
    node_url          TEXT,
    tags              JSONB NOT NULL DEFAULT '[]',
    status            TEXT NOT NULL DEFAULT 'unknown'
                      CHECK (status IN ('unknown', 'healthy', 'degraded', 'unreachable')),
    details           TEXT,
    last_heartbeat    TIMESTAMPTZ,
    status_checked_at TIMESTAMPTZ,
    registered_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The listing's exact-match filters, each in pagination order.
CREATE INDEX registry_instances_by_slug ON registry_instances (slug, seq);
CREATE INDEX registry_instances_by_deployment ON registry_instances (deployment_id, seq);
CREATE INDEX registry_instances_by_status ON registry_instances (status, seq);
CREATE INDEX registry_instances_by_host ON registry_instances (host, seq);
