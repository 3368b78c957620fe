DROP TABLE IF EXISTS registry_instances;
DROP TABLE IF EXISTS registry_definitions;
