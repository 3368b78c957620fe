-- Service definitions get an owner, as instances have: slug is the caller
-- that put the definition first and never changes; only it or a
-- registry:admin caller may replace or delete the definition. Definitions
-- stored before this migration have no owner (NULL): only an admin may
-- change them.
ALTER TABLE registry_definitions ADD COLUMN slug TEXT;
