/*
 * Configuration from LOOM_* environment variables, validated at start.
 *
 * Every variable is described once, in a table (name, type, default, limits,
 * help). loom_config_load() checks every value against it; the first bad one
 * stops loading with a single line naming the variable, the value and what is
 * allowed. Services add their own variables with the same kind of table.
 * LOOM_KAFKA_<PROPERTY> variables pass through to librdkafka
 * (LOOM_KAFKA_SASL_MECHANISMS -> sasl.mechanisms) and are checked by it.
 */
#ifndef LOOM_CONFIG_H
#define LOOM_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum {
    LOOM_CFG_STRING,   /* any non-empty text */
    LOOM_CFG_NAME,     /* [a-z0-9-], 1..63 */
    LOOM_CFG_DB_URL,   /* libpq URI or key=value conninfo; password redacted */
    LOOM_CFG_BROKERS,  /* host:port[,host:port...] */
    LOOM_CFG_LISTEN,   /* host:port[,host:port...], port 0..65535 */
    LOOM_CFG_UUID,     /* canonical UUID */
    LOOM_CFG_ENUM,     /* one of choices (comma-separated) */
    LOOM_CFG_DURATION, /* "250ms", "5s", "168h"; min/max in ms */
    LOOM_CFG_INT,      /* decimal integer in [min, max] */
    LOOM_CFG_FILE,     /* path of a readable regular file */
    LOOM_CFG_PATH,     /* a path, need not exist yet */
} loom_config_type_t;

typedef struct loom_config_var {
    const char *name; /* "LOOM_LOG_LEVEL" */
    loom_config_type_t type;
    const char *default_value; /* NULL: unset unless given */
    const char *choices;       /* LOOM_CFG_ENUM: "debug,info,warn,error" */
    int64_t min, max;          /* LOOM_CFG_INT, LOOM_CFG_DURATION (ms) */
    bool secret;               /* printed as "[redacted]" */
    const char *help;          /* one line for --help, `loom config` and docs */
    /* Optional check beyond the type's: false with what is allowed written
     * to allowed ("a comma-separated list of ..."). */
    bool (*check)(const char *value, char *allowed, size_t size);
} loom_config_var_t;

/* One loaded value. */
typedef struct loom_config_value {
    const loom_config_var_t *var; /* borrowed from the table */
    char *raw;                    /* owned; NULL when unset */
    int64_t num;                  /* INT: the value; DURATION: milliseconds */
    bool from_env;                /* false when the default applies */
} loom_config_value_t;

/* A librdkafka property given as LOOM_KAFKA_<PROPERTY>. */
typedef struct loom_config_kafka_prop {
    char *env_name; /* owned: "LOOM_KAFKA_SASL_MECHANISMS" */
    char *key;      /* owned: "sasl.mechanisms" */
    char *value;    /* owned */
} loom_config_kafka_prop_t;

typedef struct loom_config {
    /* Engine settings; strings are borrowed from values[]. */
    const char *database_url;      /* LOOM_DATABASE_URL, NULL if unset */
    const char *database_read_url; /* LOOM_DATABASE_READ_URL, NULL if unset */
    int database_pool_size;        /* LOOM_DATABASE_POOL_SIZE */
    int worker_apply_threads;      /* LOOM_WORKER_APPLY_THREADS */
    const char *kafka_brokers;     /* LOOM_KAFKA_BROKERS, NULL if unset */
    int kafka_partitions;          /* LOOM_KAFKA_PARTITIONS */
    const char *api_listen;        /* LOOM_API_LISTEN */
    char node_id[37];              /* LOOM_NODE_ID, random v4 when unset */
    const char *site_name;         /* LOOM_SITE_NAME */
    const char *site_key;          /* LOOM_SITE_KEY, NULL if unset */
    const char *log_level;         /* LOOM_LOG_LEVEL */
    const char *log_format;        /* LOOM_LOG_FORMAT */
    const char *api_tokens_file;   /* LOOM_API_TOKENS_FILE, NULL if unset */
    const char *dev_dir;           /* LOOM_DEV_DIR */
    int64_t shutdown_timeout_ms;   /* LOOM_SHUTDOWN_TIMEOUT */

    loom_config_value_t *values; /* engine variables, then extra ones */
    size_t n_values;
    loom_config_kafka_prop_t *kafka_props;
    size_t n_kafka_props;
    char **unknown; /* LOOM_* names that no table knows (warned about) */
    size_t n_unknown;
} loom_config_t;

/* The engine's variables. */
extern const loom_config_var_t loom_config_engine_vars[];
extern const size_t loom_config_engine_nvars;

/*
 * Loads and validates the configuration from envp (NULL-terminated
 * "NAME=value" strings, e.g. environ). extra/n_extra add service variables
 * (borrowed; must outlive cfg). On failure returns LOOM_ECONFIG and writes one
 * line (no newline) to errbuf; cfg is then released already.
 */
int loom_config_load(loom_config_t *cfg, char *const *envp, const loom_config_var_t *extra,
                     size_t n_extra, char *errbuf, size_t errlen);
void loom_config_release(loom_config_t *cfg);

/* Finds a loaded value by variable name; NULL when no table declares it. */
const loom_config_value_t *loom_config_get(const loom_config_t *cfg, const char *name);

/* Checks one value against its variable; 0, or LOOM_ECONFIG with the line. */
int loom_config_check(const loom_config_var_t *var, const char *value, int64_t *num, char *errbuf,
                      size_t errlen);

/* Writes the value with secrets redacted (passwords inside URLs too). */
void loom_config_redact(const loom_config_var_t *var, const char *value, char *out, size_t size);

/* Prints the effective configuration, one "NAME=value  # source" per line. */
void loom_config_print(const loom_config_t *cfg, FILE *out);

/* True for librdkafka property names that hold secrets. */
bool loom_config_kafka_key_is_secret(const char *key);

#endif
