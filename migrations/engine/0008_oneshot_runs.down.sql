DROP TABLE loom_oneshot_runs;
