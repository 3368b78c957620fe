/*
 * config.c: LOOM_* variables, validated against one table.
 *
 * Loading is all-or-nothing: the first bad value stops with one line that
 * names the variable, shows the value (redacted when secret) and says what is
 * allowed, so an operator fixes it without reading code.
 */
#include "loom/config.h"
#include "loom/clock.h"
#include "loom/error.h"
#include "loom/mem.h"
#include "loom/uuid.h"

#include <ctype.h>
#include <errno.h>
#include <libpq-fe.h>
#include <librdkafka/rdkafka.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MS_PER_DAY (86400LL * 1000)

const loom_config_var_t loom_config_engine_vars[] = {
    {"LOOM_DATABASE_URL", LOOM_CFG_DB_URL, NULL, NULL, 0, 0, false,
     "PostgreSQL/CockroachDB connection (libpq URI or key=value); `loom dev` starts its own when "
     "unset"},
    {"LOOM_DATABASE_READ_URL", LOOM_CFG_DB_URL, NULL, NULL, 0, 0, false,
     "read-only connection for ops (a replica); ops use LOOM_DATABASE_URL when unset"},
    {"LOOM_DATABASE_POOL_SIZE", LOOM_CFG_INT, "8", NULL, 1, 256, false, "connections per pool"},
    {"LOOM_WORKER_KEY_CONCURRENCY", LOOM_CFG_INT, "256", NULL, 1, 100000, false,
     "keys of one partition a consumer applies at once; one key's commands stay in order"},
    {"LOOM_WORKER_MAX_PENDING", LOOM_CFG_INT, "10000", NULL, 100, 1000000, false,
     "commands of one partition held between fetch and commit; past it the partition pauses"},
    {"LOOM_WORKER_MAX_PENDING_BYTES", LOOM_CFG_INT, "8388608", NULL, 1 << 20, 1LL << 40, false,
     "bytes of commands one consumer holds fetched and not yet finished, over all its partitions; "
     "past it a partition that holds any pauses (bounds the worker's memory under a backlog)"},
    {"LOOM_WORKER_LOCK_TIMEOUT", LOOM_CFG_DURATION, "5s", NULL, 10, 3600 * 1000LL, false,
     "a command waiting longer on a database lock fails and is retried; only its key waits"},
    {"LOOM_WORKER_PARK_AFTER", LOOM_CFG_DURATION, NULL, NULL, 1000, 3650LL * 86400 * 1000, false,
     "park a command that keeps failing for this long (unset: never; replay brings it back)"},
    {"LOOM_COMMANDS_RETENTION", LOOM_CFG_DURATION, NULL, NULL, 3600 * 1000LL,
     36500LL * 86400 * 1000, false,
     "delete rows of applied and expired commands from loom_commands once they are this old "
     "(unset: keep every row); `loom worker` refuses a value shorter than its command topics "
     "keep messages (retention.ms + segment.ms)"},
    {"LOOM_WORKER_APPLY_THREADS", LOOM_CFG_INT, "4", NULL, 1, 64, false,
     "partitions each consumer applies at once, each in its own transaction and connection"},
    {"LOOM_WORKER_LISTEN", LOOM_CFG_LISTEN, "127.0.0.1:9091", NULL, 0, 0, false,
     "address(es) where `loom worker` serves /healthz, /readyz and /metrics, host:port[,...]"},
    {"LOOM_KAFKA_BROKERS", LOOM_CFG_BROKERS, NULL, NULL, 0, 0, false,
     "Kafka bootstrap servers host:port[,host:port]; `loom dev` embeds a cluster when unset"},
    {"LOOM_KAFKA_PARTITIONS", LOOM_CFG_INT, "12", NULL, 1, 10000, false,
     "partitions of the topics `loom migrate up` creates"},
    {"LOOM_KAFKA_REPLICATION_FACTOR", LOOM_CFG_INT, "0", NULL, 0, 32, false,
     "replicas of each topic `loom migrate up` creates; 0: the broker's "
     "default.replication.factor"},
    {"LOOM_KAFKA_MIN_INSYNC_REPLICAS", LOOM_CFG_INT, "0", NULL, 0, 32, false,
     "min.insync.replicas of the topics `loom migrate up` creates (acks=all writes need that many "
     "replicas); 0: the broker's default"},
    {"LOOM_TOPIC_PREFIX", LOOM_CFG_NAME, "loom", NULL, 0, 0, false,
     "first part of every topic name: <prefix>.cmd.<service>, <prefix>.evt..."},
    {"LOOM_API_LISTEN", LOOM_CFG_LISTEN, "127.0.0.1:8080", NULL, 0, 0, false,
     "address(es) the HTTP gateway listens on, host:port[,host:port]"},
    {"LOOM_API_THREADS", LOOM_CFG_INT, "0", NULL, 0, 64, false,
     "event loops of the HTTP gateway, one thread each; 0: one per core"},
    {"LOOM_API_MAX_BODY", LOOM_CFG_INT, "4194304", NULL, 1024, 1073741824, false,
     "largest request body the gateway accepts, in bytes (413 beyond); a command must also fit "
     "its topic's max.message.bytes (10 MiB on topics `loom migrate up` creates, 1 MiB on a "
     "stock broker's), else 413 too"},
    {"LOOM_API_MAX_CONNECTIONS", LOOM_CFG_INT, "10000", NULL, 1, 1000000, false,
     "open connections the gateway holds (503 beyond)"},
    {"LOOM_API_HEADER_TIMEOUT", LOOM_CFG_DURATION, "10s", NULL, 100, 3600 * 1000LL, false,
     "time a client has to send a request's headers (408 and close beyond)"},
    {"LOOM_API_IDLE_TIMEOUT", LOOM_CFG_DURATION, "60s", NULL, 100, 3600 * 1000LL, false,
     "keep-alive idle time, and the longest stall of a request body or a response write"},
    {"LOOM_API_RATE_LIMIT", LOOM_CFG_INT, "0", NULL, 0, 1000000, false,
     "requests a second the gateway takes from one caller (token, else address); 0: no limit"},
    {"LOOM_API_RATE_BURST", LOOM_CFG_INT, "0", NULL, 0, 10000000, false,
     "requests one caller may send at once above its rate; 0: as many as LOOM_API_RATE_LIMIT"},
    {"LOOM_API_MAX_WAITERS", LOOM_CFG_INT, "128", NULL, 1, 1000000, false,
     "?wait requests the gateway holds at once; more get 503 OVERLOADED"},
    {"LOOM_API_WAIT_TARGET", LOOM_CFG_DURATION, "50ms", NULL, 0, 3600 * 1000LL, false,
     "while more than 1 in 10 ?wait requests take longer than this, the gateway holds fewer; 0: "
     "off"},
    {"LOOM_API_MAX_QUEUE", LOOM_CFG_INT, "1024", NULL, 1, 1000000, false,
     "op calls queued for the gateway's workers; more get 503 OVERLOADED"},
    {"LOOM_API_ACCESS_LOG", LOOM_CFG_ENUM, "on", "on,off", 0, 0, false,
     "on: one info line per HTTP request (method, path, status, duration, caller, ray id); off: "
     "none (requests still count in the metrics)"},
    {"LOOM_API_OP_PIPELINE", LOOM_CFG_ENUM, "on", "on,off", 0, 0, false,
     "on: statement ops (one SELECT, like messages.get) run on the gateway's event loops, "
     "pipelined on one database connection per loop; off: on the worker threads like other ops"},
    {"LOOM_NODE_ID", LOOM_CFG_UUID, NULL, NULL, 0, 0, false,
     "this process's node id (UUID); random when unset"},
    {"LOOM_SITE_NAME", LOOM_CFG_NAME, "local", NULL, 0, 0, false,
     "site name in message sources (loom://SITE/NODE)"},
    {"LOOM_SITE_KEY", LOOM_CFG_STRING, NULL, NULL, 0, 0, true, "shared secret of the site"},
    {"LOOM_LOG_LEVEL", LOOM_CFG_ENUM, "info", "debug,info,warn,error", 0, 0, false,
     "lowest level logged"},
    {"LOOM_LOG_FORMAT", LOOM_CFG_ENUM, "text", "text,json", 0, 0, false, "log line format"},
    {"LOOM_API_TOKENS_FILE", LOOM_CFG_FILE, NULL, NULL, 0, 0, false,
     "API tokens, one line each: sha256-of-token slug scope[,scope...]"},
    {"LOOM_API_TOKEN", LOOM_CFG_STRING, NULL, NULL, 0, 0, true,
     "token `loom op --url` sends to a gateway (Authorization: Bearer)"},
    {"LOOM_DEV_DIR", LOOM_CFG_PATH, "./.loom", NULL, 0, 0, false,
     "where `loom dev` keeps its private Postgres between runs"},
    {"LOOM_SHUTDOWN_TIMEOUT", LOOM_CFG_DURATION, "30s", NULL, 0, 3600 * 1000LL, false,
     "how long a graceful shutdown may take before the process gives up"},
};
const size_t loom_config_engine_nvars =
    sizeof(loom_config_engine_vars) / sizeof(loom_config_engine_vars[0]);

/* Variables the engine reads itself but that are not settings of the table. */
static bool is_engine_special(const char *name)
{
    return strncmp(name, "LOOM_KAFKA_", 11) == 0 || strncmp(name, "LOOM_TEST_", 10) == 0;
}

bool loom_config_kafka_key_is_secret(const char *key)
{
    return strstr(key, "password") || strstr(key, "secret") || strstr(key, "key") ||
           strstr(key, "jaas") || strstr(key, "token");
}

/* ---- value checks ---------------------------------------------------- */

static bool valid_host(const char *h, size_t n)
{
    if (n == 0 || n > 253)
        return false;
    if (h[0] == '[') /* [ipv6] */
        return n > 2 && h[n - 1] == ']';
    for (size_t i = 0; i < n; i++) {
        char c = h[i];
        if (!(isalnum((unsigned char)c) || c == '.' || c == '-' || c == '_'))
            return false;
    }
    return true;
}

/* Parses "host:port"; port in [minport, 65535]. */
static bool valid_hostport(const char *s, size_t n, int minport)
{
    const char *scheme = NULL;
    for (size_t i = 0; i + 2 < n; i++) {
        if (s[i] == ':' && s[i + 1] == '/' && s[i + 2] == '/') {
            scheme = s + i + 3;
            break;
        }
    }
    if (scheme) {
        n -= (size_t)(scheme - s);
        s = scheme;
    }
    const char *colon = NULL;
    for (size_t i = n; i > 0; i--) {
        if (s[i - 1] == ':') {
            colon = s + i - 1;
            break;
        }
    }
    if (!colon || !valid_host(s, (size_t)(colon - s)))
        return false;
    const char *p = colon + 1;
    size_t plen = n - (size_t)(p - s);
    if (plen == 0 || plen > 5)
        return false;
    long port = 0;
    for (size_t i = 0; i < plen; i++) {
        if (!isdigit((unsigned char)p[i]))
            return false;
        port = port * 10 + (p[i] - '0');
    }
    return port >= minport && port <= 65535;
}

static bool valid_hostport_list(const char *s, int minport)
{
    if (!*s)
        return false;
    while (*s) {
        const char *comma = strchr(s, ',');
        size_t n = comma ? (size_t)(comma - s) : strlen(s);
        if (!valid_hostport(s, n, minport))
            return false;
        if (!comma)
            break;
        s = comma + 1;
        if (!*s)
            return false;
    }
    return true;
}

static bool in_choices(const char *choices, const char *v)
{
    size_t vl = strlen(v);
    const char *p = choices;
    while (*p) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (n == vl && strncmp(p, v, n) == 0)
            return true;
        if (!comma)
            break;
        p = comma + 1;
    }
    return false;
}

void loom_config_redact(const loom_config_var_t *var, const char *value, char *out, size_t size)
{
    if (!value) {
        snprintf(out, size, "(unset)");
        return;
    }
    if (var && var->secret) {
        snprintf(out, size, "[redacted]");
        return;
    }
    if (var && var->type == LOOM_CFG_DB_URL) {
        /* URI: postgres://user:PASSWORD@host -> user:[redacted]@host */
        const char *scheme = strstr(value, "://");
        if (scheme) {
            const char *auth = scheme + 3;
            const char *at = strchr(auth, '@');
            const char *slash = strchr(auth, '/');
            const char *colon = strchr(auth, ':');
            if (at && (!slash || at < slash) && colon && colon < at) {
                snprintf(out, size, "%.*s:[redacted]%s", (int)(colon - value), value, at);
                value = out; /* continue on the result for ?password= */
            }
        }
        /* key=value form or URI query: password=... */
        const char *pw = strstr(value, "password=");
        if (pw) {
            const char *end = pw + 9;
            while (*end && *end != ' ' && *end != '&')
                end++;
            char tmp[1024];
            snprintf(tmp, sizeof(tmp), "%.*spassword=[redacted]%s", (int)(pw - value), value, end);
            snprintf(out, size, "%s", tmp);
            return;
        }
        if (value == out)
            return;
    }
    snprintf(out, size, "%s", value);
}

int loom_config_check(const loom_config_var_t *var, const char *value, int64_t *num, char *errbuf,
                      size_t errlen)
{
    const char *allowed = NULL;
    char allowed_buf[256];
    int64_t n = 0;

    switch (var->type) {
    case LOOM_CFG_STRING:
    case LOOM_CFG_PATH:
        if (!*value)
            allowed = "a non-empty value";
        break;
    case LOOM_CFG_NAME: {
        size_t len = strlen(value);
        bool ok = len >= 1 && len <= 63;
        for (size_t i = 0; ok && i < len; i++)
            ok = islower((unsigned char)value[i]) || isdigit((unsigned char)value[i]) ||
                 value[i] == '-';
        if (!ok)
            allowed = "1 to 63 characters of a-z, 0-9 and -";
        break;
    }
    case LOOM_CFG_DB_URL: {
        char *pqerr = NULL;
        PQconninfoOption *opts = *value ? PQconninfoParse(value, &pqerr) : NULL;
        const char *bad_port = NULL;
        for (PQconninfoOption *o = opts; o && o->keyword; o++) {
            if (strcmp(o->keyword, "port") != 0 || !o->val)
                continue;
            for (const char *p = o->val; *p && !bad_port;) {
                size_t len = strcspn(p, ",");
                long port = 0;
                for (size_t i = 0; i < len && port <= 65535; i++)
                    port = isdigit((unsigned char)p[i]) ? port * 10 + (p[i] - '0') : 65536;
                if (len == 0 || port < 1 || port > 65535)
                    bad_port = o->val;
                p += len + (p[len] == ',');
            }
        }
        if (bad_port) {
            snprintf(allowed_buf, sizeof(allowed_buf),
                     "a libpq connection URI or conninfo with ports 1-65535 (port \"%s\")",
                     bad_port);
            allowed = allowed_buf;
        } else if (!opts) {
            snprintf(allowed_buf, sizeof(allowed_buf),
                     "a libpq connection URI (postgresql://user@host:port/db) or key=value "
                     "conninfo%s%.*s",
                     pqerr ? "; libpq says: " : "", pqerr ? (int)strcspn(pqerr, "\n") : 0,
                     pqerr ? pqerr : "");
            allowed = allowed_buf;
        }
        PQconninfoFree(opts);
        PQfreemem(pqerr);
        break;
    }
    case LOOM_CFG_BROKERS:
        if (!valid_hostport_list(value, 1))
            allowed = "host:port[,host:port...] with ports 1-65535";
        break;
    case LOOM_CFG_LISTEN:
        if (!valid_hostport_list(value, 0))
            allowed = "host:port[,host:port...] with ports 0-65535";
        break;
    case LOOM_CFG_UUID:
        if (!loom_uuid_is_valid(value))
            allowed = "a UUID such as 0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d";
        break;
    case LOOM_CFG_ENUM:
        if (!in_choices(var->choices, value)) {
            size_t k = (size_t)snprintf(allowed_buf, sizeof(allowed_buf), "one of ");
            for (const char *c = var->choices; *c && k + 3 < sizeof(allowed_buf); c++) {
                allowed_buf[k++] = *c;
                if (*c == ',')
                    allowed_buf[k++] = ' ';
            }
            allowed_buf[k] = '\0';
            allowed = allowed_buf;
        }
        break;
    case LOOM_CFG_DURATION: {
        char lo[32], hi[32];
        loom_duration_format(var->min, lo, sizeof(lo));
        loom_duration_format(var->max, hi, sizeof(hi));
        if (loom_duration_parse_ms(value, &n) != 0 || n < var->min || n > var->max) {
            snprintf(allowed_buf, sizeof(allowed_buf),
                     "a duration such as 500ms, 30s, 5m or 168h, from %s to %s", lo, hi);
            allowed = allowed_buf;
        }
        break;
    }
    case LOOM_CFG_INT: {
        char *end = NULL;
        errno = 0;
        long long v = *value ? strtoll(value, &end, 10) : 0;
        if (!*value || errno || *end || v < var->min || v > var->max) {
            snprintf(allowed_buf, sizeof(allowed_buf), "an integer from %lld to %lld",
                     (long long)var->min, (long long)var->max);
            allowed = allowed_buf;
        }
        n = v;
        break;
    }
    case LOOM_CFG_FILE: {
        struct stat st;
        if (!*value || stat(value, &st) != 0 || !S_ISREG(st.st_mode) || access(value, R_OK) != 0)
            allowed = "the path of a readable file";
        break;
    }
    }
    if (!allowed && var->check && !var->check(value, allowed_buf, sizeof(allowed_buf)))
        allowed = allowed_buf;
    if (allowed) {
        char shown[512];
        loom_config_redact(var, value, shown, sizeof(shown));
        snprintf(errbuf, errlen, "invalid %s=\"%s\": expected %s", var->name, shown, allowed);
        return LOOM_ECONFIG;
    }
    if (num)
        *num = n;
    return 0;
}

/* ---- loading ---------------------------------------------------------- */

static const char *env_lookup(char *const *envp, const char *name, bool *found)
{
    size_t nl = strlen(name);
    *found = false;
    for (char *const *e = envp; e && *e; e++) {
        if (strncmp(*e, name, nl) == 0 && (*e)[nl] == '=') {
            *found = true;
            return *e + nl + 1;
        }
    }
    return NULL;
}

static const loom_config_var_t *find_var(const loom_config_var_t *extra, size_t n_extra,
                                         const char *name, size_t nl)
{
    for (size_t i = 0; i < loom_config_engine_nvars; i++)
        if (strlen(loom_config_engine_vars[i].name) == nl &&
            strncmp(loom_config_engine_vars[i].name, name, nl) == 0)
            return &loom_config_engine_vars[i];
    for (size_t i = 0; i < n_extra; i++)
        if (strlen(extra[i].name) == nl && strncmp(extra[i].name, name, nl) == 0)
            return &extra[i];
    return NULL;
}

/* "LOOM_KAFKA_SASL_MECHANISMS" -> "sasl.mechanisms" */
static char *kafka_key_from_env(const char *env_name, size_t nl)
{
    char *key = loom_xstrndup(env_name + 11, nl - 11);
    for (char *p = key; *p; p++)
        *p = *p == '_' ? '.' : (char)tolower((unsigned char)*p);
    return key;
}

static int load_kafka_props(loom_config_t *cfg, char *const *envp, char *errbuf, size_t errlen)
{
    rd_kafka_conf_t *probe = rd_kafka_conf_new();
    int rc = 0;
    for (char *const *e = envp; e && *e; e++) {
        if (strncmp(*e, "LOOM_KAFKA_", 11) != 0)
            continue;
        const char *eq = strchr(*e, '=');
        if (!eq)
            continue;
        size_t nl = (size_t)(eq - *e);
        if (find_var(NULL, 0, *e, nl)) /* LOOM_KAFKA_BROKERS, LOOM_KAFKA_PARTITIONS */
            continue;
        char *key = kafka_key_from_env(*e, nl);
        char rderr[256];
        if (nl == 11 ||
            rd_kafka_conf_set(probe, key, eq + 1, rderr, sizeof(rderr)) != RD_KAFKA_CONF_OK) {
            const char *shown = loom_config_kafka_key_is_secret(key) ? "[redacted]" : eq + 1;
            snprintf(errbuf, errlen,
                     "invalid %.*s=\"%s\": expected a librdkafka property \"%s\" it accepts%s%s",
                     (int)nl, *e, shown, key, nl == 11 ? "" : ": ", nl == 11 ? "" : rderr);
            free(key);
            rc = LOOM_ECONFIG;
            break;
        }
        cfg->kafka_props =
            loom_xrealloc(cfg->kafka_props, (cfg->n_kafka_props + 1) * sizeof(*cfg->kafka_props));
        loom_config_kafka_prop_t *p = &cfg->kafka_props[cfg->n_kafka_props++];
        p->env_name = loom_xstrndup(*e, nl);
        p->key = key;
        p->value = loom_xstrdup(eq + 1);
    }
    rd_kafka_conf_destroy(probe);
    return rc;
}

int loom_config_load(loom_config_t *cfg, char *const *envp, const loom_config_var_t *extra,
                     size_t n_extra, char *errbuf, size_t errlen)
{
    memset(cfg, 0, sizeof(*cfg));
    size_t total = loom_config_engine_nvars + n_extra;
    cfg->values = loom_xcalloc(total, sizeof(*cfg->values));
    cfg->n_values = total;

    for (size_t i = 0; i < total; i++) {
        const loom_config_var_t *var = i < loom_config_engine_nvars
                                           ? &loom_config_engine_vars[i]
                                           : &extra[i - loom_config_engine_nvars];
        loom_config_value_t *v = &cfg->values[i];
        bool found;
        const char *s = env_lookup(envp, var->name, &found);
        v->var = var;
        v->from_env = found;
        if (!found)
            s = var->default_value;
        if (!s)
            continue;
        if (loom_config_check(var, s, &v->num, errbuf, errlen) != 0) {
            loom_config_release(cfg);
            return LOOM_ECONFIG;
        }
        v->raw = loom_xstrdup(s);
    }
    if (load_kafka_props(cfg, envp, errbuf, errlen) != 0) {
        loom_config_release(cfg);
        return LOOM_ECONFIG;
    }
    for (char *const *e = envp; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (strncmp(*e, "LOOM_", 5) != 0 || !eq)
            continue;
        size_t nl = (size_t)(eq - *e);
        if (find_var(extra, n_extra, *e, nl) || is_engine_special(*e))
            continue;
        cfg->unknown = loom_xrealloc(cfg->unknown, (cfg->n_unknown + 1) * sizeof(char *));
        cfg->unknown[cfg->n_unknown++] = loom_xstrndup(*e, nl);
    }

    cfg->database_url = loom_config_get(cfg, "LOOM_DATABASE_URL")->raw;
    cfg->database_read_url = loom_config_get(cfg, "LOOM_DATABASE_READ_URL")->raw;
    cfg->database_pool_size = (int)loom_config_get(cfg, "LOOM_DATABASE_POOL_SIZE")->num;
    cfg->worker_apply_threads = (int)loom_config_get(cfg, "LOOM_WORKER_APPLY_THREADS")->num;
    cfg->kafka_brokers = loom_config_get(cfg, "LOOM_KAFKA_BROKERS")->raw;
    cfg->kafka_partitions = (int)loom_config_get(cfg, "LOOM_KAFKA_PARTITIONS")->num;
    cfg->api_listen = loom_config_get(cfg, "LOOM_API_LISTEN")->raw;
    cfg->site_name = loom_config_get(cfg, "LOOM_SITE_NAME")->raw;
    cfg->site_key = loom_config_get(cfg, "LOOM_SITE_KEY")->raw;
    cfg->log_level = loom_config_get(cfg, "LOOM_LOG_LEVEL")->raw;
    cfg->log_format = loom_config_get(cfg, "LOOM_LOG_FORMAT")->raw;
    cfg->api_tokens_file = loom_config_get(cfg, "LOOM_API_TOKENS_FILE")->raw;
    cfg->dev_dir = loom_config_get(cfg, "LOOM_DEV_DIR")->raw;
    cfg->shutdown_timeout_ms = loom_config_get(cfg, "LOOM_SHUTDOWN_TIMEOUT")->num;
    const char *node = loom_config_get(cfg, "LOOM_NODE_ID")->raw;
    if (node) {
        snprintf(cfg->node_id, sizeof(cfg->node_id), "%s", node);
        for (char *p = cfg->node_id; *p; p++)
            *p = (char)tolower((unsigned char)*p);
    } else {
        loom_uuid_t u;
        loom_uuid_v4(&u);
        loom_uuid_format(&u, cfg->node_id);
    }
    return 0;
}

void loom_config_release(loom_config_t *cfg)
{
    for (size_t i = 0; i < cfg->n_values; i++)
        free(cfg->values[i].raw);
    free(cfg->values);
    for (size_t i = 0; i < cfg->n_kafka_props; i++) {
        free(cfg->kafka_props[i].env_name);
        free(cfg->kafka_props[i].key);
        free(cfg->kafka_props[i].value);
    }
    free(cfg->kafka_props);
    for (size_t i = 0; i < cfg->n_unknown; i++)
        free(cfg->unknown[i]);
    free(cfg->unknown);
    memset(cfg, 0, sizeof(*cfg));
}

const loom_config_value_t *loom_config_get(const loom_config_t *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->n_values; i++)
        if (strcmp(cfg->values[i].var->name, name) == 0)
            return &cfg->values[i];
    return NULL;
}

void loom_config_print(const loom_config_t *cfg, FILE *out)
{
    char shown[1024];
    for (size_t i = 0; i < cfg->n_values; i++) {
        const loom_config_value_t *v = &cfg->values[i];
        const char *raw = v->raw;
        const char *source = v->from_env ? "environment" : (raw ? "default" : "unset");
        if (strcmp(v->var->name, "LOOM_NODE_ID") == 0 && !raw) {
            raw = cfg->node_id;
            source = "random";
        }
        if (raw)
            loom_config_redact(v->var, raw, shown, sizeof(shown));
        else
            shown[0] = '\0';
        fprintf(out, "%s=%s\t# %s\n", v->var->name, shown, source);
    }
    for (size_t i = 0; i < cfg->n_kafka_props; i++) {
        const loom_config_kafka_prop_t *p = &cfg->kafka_props[i];
        fprintf(out, "%s=%s\t# environment, librdkafka %s\n", p->env_name,
                loom_config_kafka_key_is_secret(p->key) ? "[redacted]" : p->value, p->key);
    }
    for (size_t i = 0; i < cfg->n_unknown; i++)
        fprintf(out, "# warning: %s is not a Loom variable (ignored)\n", cfg->unknown[i]);
}
