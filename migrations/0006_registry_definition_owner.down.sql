ALTER TABLE registry_definitions DROP COLUMN slug;
