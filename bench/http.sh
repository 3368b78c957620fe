#!/usr/bin/env bash
# bench/http.sh: the HTTP gateway against nginx, measured in the same run on
# the same machine (../shared/PERFORMANCE.md). One command:
#
#   bench/http.sh            build (Release), start a private Postgres, a real
#                            Kafka broker, nginx (`return 200` JSON, 1 worker) and
#                            `loom api`; run wrk -t1 -c64 -d8s against nginx, a
#                            read route and a write route; print one table and
#                            append it to docs/benchmarks.md
#   bench/http.sh --quick    2 s per run (a smoke run; not appended)
#
# The read route is GET /v1/commands/{id} (the op engine.commands.get: a point
# SELECT by message id in a READ ONLY transaction); the write route publishes a
# command and answers 202 after the broker acknowledged it. wrk must see no
# socket errors and no non-2xx answers, or the script fails.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
secs=8
quick=0
case "${1:-}" in
  --quick) quick=1; secs=2 ;;
  --help|-h) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
for tool in wrk nginx psql kcat; do
  command -v "$tool" >/dev/null || { echo "bench/http.sh: $tool is not installed (./scripts/setup installs it)" >&2; exit 1; }
done

build=${LOOM_BENCH_BUILD:-$here/build-bench}
state=$(mktemp -d /tmp/loom-bench-http-XXXXXX)
chmod 755 "$state"
api_pid=""
cleanup() {
  [ -n "$api_pid" ] && kill "$api_pid" 2>/dev/null && wait "$api_pid" 2>/dev/null || true
  [ -f "$state/nginx.pid" ] && kill "$(cat "$state/nginx.pid")" 2>/dev/null || true
  "$build/tests/loom_testenv" pg-stop "$state" >/dev/null 2>&1 || true
  "$here/scripts/kafka-broker" stop "$state/kafka" >/dev/null 2>&1 || true
  rm -rf "$state"
}
trap cleanup EXIT

echo "bench: building (Release) into $build" >&2
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target bench_gateway_app loom_testenv >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$build/tests/loom_testenv" pg-start "$state" >/dev/null
pg_url=$(sed -n 's/^LOOM_TEST_DATABASE_URL=//p' "$state/pg.env")
brokers=$("$here/scripts/kafka-broker" start "$state/kafka" | tail -1)
psql -q "$pg_url" -c "CREATE DATABASE bench_http" >/dev/null
db_url="${pg_url%/*}/bench_http"
app="$build/bench/bench_gateway_app"
LOOM_DATABASE_URL="$db_url" "$app" migrate up >/dev/null
cmd_id=0191b2c4-7e1f-7a3b-9c1d-2e3f4a5b6c7d
psql -q "$db_url" -c "INSERT INTO loom_commands (consumer, message_id, type, topic, kafka_partition,
  kafka_offset, status, result) VALUES ('bench', '$cmd_id', 'bench.noop', 't', 0, 0, 'applied',
  '{\"ok\":true}')" >/dev/null
echo "bench: postgres $pg_url, kafka $brokers" >&2

# nginx: return 200 with a small JSON body, one worker, access log off.
nginx_port=$(free_port)
mkdir -p "$state/nginx"
cat >"$state/nginx.conf" <<CONF
worker_processes 1;
pid $state/nginx.pid;
error_log $state/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $state/nginx;
  proxy_temp_path $state/nginx;
  fastcgi_temp_path $state/nginx;
  uwsgi_temp_path $state/nginx;
  scgi_temp_path $state/nginx;
  server {
    listen 127.0.0.1:$nginx_port;
    location / { default_type application/json; return 200 '{"status":"ok"}'; }
  }
}
CONF
nginx -p "$state/nginx" -c "$state/nginx.conf"

# loom api with one token holding every scope.
token=bench-token-0123456789
printf '%s bench *\n' "$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)" >"$state/tokens"
api_port=$(free_port)
LOOM_API_LISTEN=127.0.0.1:$api_port LOOM_DATABASE_URL="$db_url" LOOM_KAFKA_BROKERS="$brokers" \
  LOOM_API_TOKENS_FILE="$state/tokens" "$app" api >"$state/api.out" 2>"$state/api.log" &
api_pid=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$api_port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$api_port/readyz" >/dev/null || { cat "$state/api.log" >&2; exit 1; }

cat >"$state/write.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"account":"acct-1","amount":1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
LUA
read_url="http://127.0.0.1:$api_port/v1/commands/$cmd_id"
write_url="http://127.0.0.1:$api_port/v1/bench/commands"
# Warm-up: creates the topic, fills the pools.
curl -sf -XPOST -H "Authorization: Bearer $token" -d '{}' "$write_url" >/dev/null
wrk -t1 -c16 -d1s -H "Authorization: Bearer $token" "$read_url" >/dev/null
wrk -t1 -c16 -d1s -s "$state/write.lua" "$write_url" >/dev/null

# Runs wrk; prints "req/s p50 p99"; fails on socket errors or non-2xx answers.
run() {
  local name=$1; shift
  local out
  out=$(wrk -t1 -c64 -d"${secs}s" --latency "$@")
  echo "$out" >"$state/wrk-$name.txt"
  if echo "$out" | grep -qE 'Socket errors|Non-2xx'; then
    echo "bench: wrk saw errors on $name:" >&2
    echo "$out" >&2
    exit 1
  fi
  local rps p50 p99
  rps=$(echo "$out" | awk '/Requests\/sec/{printf "%.0f", $2}')
  p50=$(echo "$out" | awk '$1=="50%"{print $2}')
  p99=$(echo "$out" | awk '$1=="99%"{print $2}')
  echo "$rps $p50 $p99"
}
read -r nginx_rps nginx_p50 nginx_p99 < <(run nginx "http://127.0.0.1:$nginx_port/")
read -r read_rps read_p50 read_p99 < <(run read -H "Authorization: Bearer $token" "$read_url")
read -r write_rps write_p50 write_p99 < <(run write -s "$state/write.lua" "$write_url")
health_rps=$(run health "http://127.0.0.1:$api_port/healthz" | cut -d' ' -f1)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "-" }'; }
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
mem=$(free -g | awk '/Mem:/{print $2}')
table=$(cat <<EOF2
| what (wrk -t1 -c64 -d${secs}s) | req/s | p50 | p99 | ratio to nginx |
|---|---|---|---|---|
| nginx \`return 200\` JSON, 1 worker (baseline) | $nginx_rps | $nginx_p50 | $nginx_p99 | 1.00 |
| loom api \`GET /healthz\` (no op, no token) | $health_rps | | | $(ratio "$health_rps" "$nginx_rps") |
| loom api read: \`GET /v1/commands/{id}\` (token, op, point SELECT) | $read_rps | $read_p50 | $read_p99 | $(ratio "$read_rps" "$nginx_rps") |
| loom api write: \`POST\` → 202 after the Kafka ack | $write_rps | $write_p50 | $write_p99 | $(ratio "$write_rps" "$nginx_rps") |
EOF2
)
echo
echo "HTTP gateway benchmark, $(date -u +%F), $(nproc) cores, ${mem} GiB, commit $commit"
echo
echo "$table"
if [ "$quick" = 0 ]; then
  {
    echo
    echo "## HTTP gateway, run of $(date -u +%F) (bench/http.sh)"
    echo
    echo "Machine: $(nproc) cores, ${mem} GiB; commit $commit. nginx, \`loom api\` (LOOM_API_THREADS"
    echo "default: one loop per core, access log on, to a file), a private PostgreSQL and a real"
    echo "single-node Kafka broker all on this machine, with wrk on loopback."
    echo
    echo "$table"
  } >>docs/benchmarks.md
  echo "bench: appended to docs/benchmarks.md" >&2
fi
