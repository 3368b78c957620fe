UPDATE registry_instances SET status = 'unknown', details = NULL WHERE status = 'not_probed';
ALTER TABLE registry_instances DROP CONSTRAINT registry_instances_status_check;
ALTER TABLE registry_instances ADD CONSTRAINT registry_instances_status_check
    CHECK (status IN ('unknown', 'healthy', 'degraded', 'unreachable'));
ALTER TABLE registry_definitions DROP COLUMN slug;
