-- Service definitions get an owner, as instances have: slug is the caller
-- that put the definition first and never changes; only it or a
-- registry:admin caller may replace or delete the definition. Definitions
-- stored before this migration have no owner (NULL): only an admin may
-- change them.
ALTER TABLE registry_definitions ADD COLUMN slug TEXT;

-- The health probe connects only to addresses in LOOM_REGISTRY_PROBE_ALLOW;
-- an instance outside it has the status not_probed (details say why).
ALTER TABLE registry_instances DROP CONSTRAINT registry_instances_status_check;
ALTER TABLE registry_instances ADD CONSTRAINT registry_instances_status_check
    CHECK (status IN ('unknown', 'healthy', 'degraded', 'unreachable', 'not_probed'));
