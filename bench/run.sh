#!/usr/bin/env bash
# The benchmark: builds the release binary and the load generator, starts a mock upstream,
# and measures side by side, in one run, with one load generator and the same CPU pinning:
# direct to the mock, nginx `proxy_pass` adding the key, and the proxy with JWT (cached
# tokens and all-new tokens; chat, and beside it the Responses API and embeddings), JWT with
# Redis limits, and HMAC; then streams at scale: 1,000,
# 4,000 and 10,000 concurrent long streams through nginx and through the proxy. Writes
# docs/benchmarks.md (the figures between its markers) and docs/benchmarks.svg.
#
#   bench/run.sh           full run (installs nginx and redis-server on Debian if missing)
#   bench/run.sh --smoke   a few seconds, debug binaries, no nginx, output to a temp dir:
#                          keeps the script working in CI; its figures mean nothing
#
# BENCH_STREAM_SCALES (e.g. "1000 4000") chooses the stream counts of the full run.
#
# Pinning: the proxy (or nginx) on CPU 0; the load generator, the mock and Redis on CPU 1.
# Limits are set far above the load: the run prices the checks, never a refusal.
# Only 127.0.0.1 is ever contacted; every load loop is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

smoke=false
for arg in "$@"; do
  case $arg in
    --smoke) smoke=true ;;
    *) echo "usage: bench/run.sh [--smoke]" >&2; exit 2 ;;
  esac
done

if $smoke; then
  duration=0.3 warmup=0.1 c1_duration=0.2 stream_duration=0.4 cold_runs=1 new_tokens=200 rotation_tokens=50
  conns=4 sse_chunks=3 sse_interval_us=2000
  stream_scales=20 scale_chunks=5 scale_interval_us=10000 scale_ramp=0.05 scale_warmup=0.1 scale_duration=0.3
  out=$(mktemp -d)
  md=$out/benchmarks.md svg=$out/benchmarks.svg
  cp docs/benchmarks.md "$md" 2>/dev/null || true
else
  duration=${BENCH_DURATION:-5} warmup=1 c1_duration=3 stream_duration=4 cold_runs=10 new_tokens=${BENCH_NEW_TOKENS:-40000} rotation_tokens=1000
  conns=32 sse_chunks=20 sse_interval_us=5000
  # A stream lasts 50 chunks 100 ms apart (5 s): starts spread over one stream's length,
  # measured over two.
  stream_scales=${BENCH_STREAM_SCALES:-1000 4000 10000}
  scale_chunks=50 scale_interval_us=100000 scale_ramp=5 scale_warmup=6 scale_duration=10
  out=$(mktemp -d)
  md=docs/benchmarks.md svg=docs/benchmarks.svg
fi
results=$out/results.jsonl
: >"$results"
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$status" != 0 ] || ! $smoke; then
    echo "bench: work files (logs, results) in $out" >&2
  else
    rm -rf "$out"
  fi
}
trap cleanup EXIT

say() { if ! $smoke; then echo "bench: $*"; fi; }

# --- tools -------------------------------------------------------------------------------
need=()
command -v python3 >/dev/null || need+=(python3)
command -v redis-server >/dev/null || need+=(redis-server)
if ! $smoke; then
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  elif $smoke && [ "${need[*]}" = redis-server ]; then
    :
  else
    echo "bench: needs ${need[*]} (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
export PATH=$PATH:/usr/sbin

# Each open stream costs the process under test two sockets (client and upstream), the
# generator one and the mock one: raise the limit on open files to 65,536 where the
# process may (root with CAP_SYS_RESOURCE, up to fs.nr_open), else the soft limit to the
# hard one (allowed to anyone); the rows that need more are skipped, and say so.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fd_limit=$(ulimit -n)

target=${CARGO_TARGET_DIR:-target}
if $smoke; then
  bin=$target/debug/api-key-server loadgen=$target/debug/examples/loadgen
  # A no-op after `cargo test --all-targets`; else the smoke would run stale binaries.
  cargo build --quiet --locked --bin api-key-server --example loadgen
else
  say "building (release)"
  # Separately: built together, the binary would get the dev-dependencies' tokio features.
  cargo build --quiet --release --locked --bin api-key-server
  cargo build --quiet --release --locked --example loadgen
  bin=$target/release/api-key-server loadgen=$target/release/examples/loadgen
fi

if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  on_proxy=(taskset -c 0) on_load=(taskset -c 1) pinning="proxy on CPU 0; load generator, mock and Redis on CPU 1"
else
  on_proxy=() on_load=() pinning="not pinned (needs taskset and 2 CPUs)"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
record() { echo "$1" >>"$results"; }
rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

# --- machine and versions ----------------------------------------------------------------
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
record "$(python3 - "$bin" "$pinning" "$smoke" "$load_start" <<'EOF'
import json, platform, subprocess, sys, datetime
def run(*cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except Exception:
        return "not installed"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
os_name = next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release") if l.startswith("PRETTY_NAME")), "?")
print(json.dumps({"label": "meta", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
  "rustc": run("rustc", "--version"), "nginx": run("nginx", "-v"), "redis": run("redis-server", "--version"),
  "kernel": platform.release(), "os": os_name, "cpu": cpu, "cpus": __import__("os").cpu_count(),
  "binary": sys.argv[1], "pinning": sys.argv[2], "smoke": sys.argv[3] == "true", "load_start": sys.argv[4]}))
EOF
)"

# --- mock upstream -----------------------------------------------------------------------
"${on_load[@]}" "$loadgen" mock --sse-chunks "$sse_chunks" --sse-interval-us "$sse_interval_us" >"$out/mock.addr" &
mock_pid=$!
pids+=("$mock_pid")
for _ in $(seq 100); do [ -s "$out/mock.addr" ] && break; sleep 0.05; done
mock_url="http://$(head -1 "$out/mock.addr")/v1/chat/completions"

# --- credentials and the proxy's settings ------------------------------------------------
say "minting tokens"
"$loadgen" mint --key tests/fixtures/jwt-private.pem --count "$rotation_tokens" --out "$out/tokens.txt"
"$loadgen" mint --key tests/fixtures/jwt-private.pem --count "$new_tokens" --out "$out/new-tokens.txt"
export BENCH_HMAC_SECRET=bench-hmac-secret-0123456789abcdef-0123456789
export API_KEY_SERVER_PRODUCT_KEYS='{"demo":"sk-bench-upstream-key"}'
API_KEY_SERVER_JWT_PUBLIC_KEYS=$(python3 -c 'import json,sys; print(json.dumps({"bench": open(sys.argv[1]).read()}))' tests/fixtures/jwt-public.pem)
export API_KEY_SERVER_JWT_PUBLIC_KEYS
export API_KEY_SERVER_CLIENT_HMAC_SECRETS="{\"bench\":\"$BENCH_HMAC_SECRET\"}"
export API_KEY_SERVER_OPENAI_BASE_URL=$mock_url
export API_KEY_SERVER_RATE_LIMIT_CAPACITY=1000000000
export API_KEY_SERVER_RATE_LIMIT_REFILL_PER_SECOND=1000000000
export API_KEY_SERVER_DAILY_QUOTA=1000000000000
export API_KEY_SERVER_LOG_FORMAT=json
unset RUST_LOG API_KEY_SERVER_REDIS_URL

# run <label> <url> <pids> [loadgen run options...]: one measurement, appended to the results.
run() {
  local label=$1 url=$2 pidlist=$3
  shift 3
  local pidargs=()
  for p in $pidlist; do pidargs+=(--pid "$p"); done
  # A failed measurement fails the script (a `$(...)` inside an argument would not).
  local out
  out=$("${on_load[@]}" "$loadgen" run --label "$label" --url "$url" "${pidargs[@]}" "$@")
  record "$out"
}

# measure <row> <url> <pids> <mode options...>: the fixed-concurrency run, then one at a time.
measure() {
  local row=$1 url=$2 pidlist=$3
  shift 3
  say "$row"
  run "$row" "$url" "$pidlist" --connections "$conns" --duration "$duration" --warmup "$warmup" "$@"
  run "$row/c1" "$url" "$pidlist" --connections 1 --duration "$c1_duration" --warmup "$warmup" "$@"
}

stream() {
  local row=$1 url=$2 pidlist=$3
  shift 3
  run "$row/stream" "$url" "$pidlist" --connections 4 --duration "$stream_duration" --warmup 0.2 --stream "$@"
}

# start_proxy <row> [VAR=value...]: starts the proxy on CPU 0, logs (one JSON line per
# request, as in production) to a file; sets proxy_pid and proxy_url, records idle RSS.
start_proxy() {
  local row=$1 port
  shift
  port=$(free_port)
  env "$@" PORT="$port" "${on_proxy[@]}" "$bin" >"$out/$row.log" 2>&1 &
  proxy_pid=$!
  pids+=("$proxy_pid")
  "$loadgen" wait --port "$port"
  sleep 0.2
  proxy_url="http://127.0.0.1:$port/v1/chat/completions"
  record "{\"label\":\"$row/idle\",\"rss_kib\":$(rss_kib "$proxy_pid")}"
}

stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# start_nginx <row> <upstream host:port> <connections>: one worker on CPU 0, keepalive to
# the upstream, answers not buffered; sets nginx_pid, workers and nginx_url, and records
# the idle RSS (master and worker).
start_nginx() {
  local row=$1 upstream=$2 connections=$3 port dir
  port=$(free_port)
  dir=$out/$row
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $((connections + 64));
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $connections; }
http {
  # One access log line per request, written as it happens: the proxy logs every request too.
  access_log $dir/access.log;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  upstream mock { server $upstream; keepalive 64; }
  server {
    listen 127.0.0.1:$port;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer sk-bench-upstream-key";
      # Streams pass chunk by chunk, as an LLM gateway must.
      proxy_buffering off;
    }
  }
}
EOF
  "${on_proxy[@]}" nginx -p "$dir" -c "$dir/nginx.conf" &
  nginx_pid=$!
  pids+=("$nginx_pid")
  for _ in $(seq 100); do
    workers=$(pgrep -P "$nginx_pid" | tr '\n' ' ' || true)
    [ -n "$workers" ] && break
    sleep 0.05
  done
  sleep 0.3
  workers=$(pgrep -P "$nginx_pid" | tr '\n' ' ')
  record "{\"label\":\"$row/idle\",\"rss_kib\":$(($(rss_kib "$nginx_pid") + $(rss_kib ${workers%% *})))}"
  nginx_url="http://127.0.0.1:$port/v1/chat/completions"
}

# --- direct ------------------------------------------------------------------------------
measure direct "$mock_url" "$mock_pid"
stream direct "$mock_url" "$mock_pid"

# --- nginx -------------------------------------------------------------------------------
if $smoke; then
  record '{"label":"nginx/skipped","reason":"smoke mode does not start nginx"}'
elif command -v nginx >/dev/null; then
  start_nginx nginx "$(head -1 "$out/mock.addr")" 4096
  measure nginx "$nginx_url" "$nginx_pid $workers"
  stream nginx "$nginx_url" "$nginx_pid $workers"
  stop "$nginx_pid"
else
  record '{"label":"nginx/skipped","reason":"nginx is not installed"}'
fi

# --- the proxy ---------------------------------------------------------------------------
start_proxy jwt-memory
measure jwt-memory "$proxy_url" "$proxy_pid" --mode jwt --tokens "$out/tokens.txt"
stream jwt-memory "$proxy_url" "$proxy_pid" --mode jwt --tokens "$out/tokens.txt"
stop "$proxy_pid"

# The same row on the Responses API (each answer's id recorded for its owner) and on
# embeddings: a fresh proxy each, so that each row's memory is its own.
for api in responses embeddings; do
  start_proxy "jwt-$api"
  measure "jwt-$api" "${proxy_url%/chat/completions}/$api" "$proxy_pid" --api "$api" --mode jwt \
    --tokens "$out/tokens.txt"
  stop "$proxy_pid"
done

# Budgets on and never refusing (a budget no request comes near): what metering,
# reservation and settlement cost per request, against jwt-memory above.
budget_env=(API_KEY_SERVER_MODEL_PRICES='{"gpt-4o":{"input":2.5,"output":10,"cached_input":1.25},"gpt-4o-mini":{"input":0.15,"output":0.6},"text-embedding-3-small":{"input":0.02},"text-embedding-3-large":{"input":0.13}}'
  API_KEY_SERVER_DAILY_BUDGET_USD=1000000000)
start_proxy jwt-budget "${budget_env[@]}"
measure jwt-budget "$proxy_url" "$proxy_pid" --mode jwt --tokens "$out/tokens.txt"
if ! grep -q '"budget_store":"memory"' "$out/jwt-budget.log"; then
  echo "bench: the budget row did not meter with budgets; see $out/jwt-budget.log" >&2
  exit 1
fi
stop "$proxy_pid"

start_proxy jwt-new
say "jwt-new"
# Every request brings a token never seen before, so each costs an RSA verification; the
# run ends early when the pre-minted pool is used up.
"${on_load[@]}" "$loadgen" run --url "$proxy_url" --mode jwt --tokens "$out/tokens.txt" --connections "$conns" \
  --duration "$warmup" --warmup 0 >/dev/null # warm the upstream pool; not recorded
run jwt-new "$proxy_url" "$proxy_pid" --mode jwt-new --tokens "$out/new-tokens.txt" \
  --connections "$conns" --duration "$duration" --warmup 0
stop "$proxy_pid"

if command -v redis-server >/dev/null; then
  redis_port=$(free_port)
  "${on_load[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no >"$out/redis.log" 2>&1 &
  redis_pid=$!
  pids+=("$redis_pid")
  for _ in $(seq 100); do
    python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.1)' "$redis_port" \
      2>/dev/null && break
    sleep 0.05
  done
  start_proxy jwt-redis API_KEY_SERVER_REDIS_URL="redis://127.0.0.1:$redis_port"
  # The connection to Redis is made in the background.
  for _ in $(seq 100); do grep -q 'connected to Redis' "$out/jwt-redis.log" && break; sleep 0.05; done
  measure jwt-redis "$proxy_url" "$proxy_pid" --mode jwt --tokens "$out/tokens.txt"
  if ! grep -q 'connected to Redis' "$out/jwt-redis.log" || grep -q 'Redis unavailable' "$out/jwt-redis.log"; then
    echo "bench: the Redis row fell back to memory; see $out/jwt-redis.log" >&2
    exit 1
  fi
  stop "$proxy_pid"
  # Budgets in Redis: one script call to reserve and one to settle per request.
  start_proxy jwt-redis-budget API_KEY_SERVER_REDIS_URL="redis://127.0.0.1:$redis_port" "${budget_env[@]}"
  for _ in $(seq 100); do grep -q 'connected to Redis' "$out/jwt-redis-budget.log" && break; sleep 0.05; done
  measure jwt-redis-budget "$proxy_url" "$proxy_pid" --mode jwt --tokens "$out/tokens.txt"
  if ! grep -q '"budget_store":"redis"' "$out/jwt-redis-budget.log" || grep -q 'Redis unavailable' "$out/jwt-redis-budget.log"; then
    echo "bench: the Redis budget row did not decide in Redis; see $out/jwt-redis-budget.log" >&2
    exit 1
  fi
  stop "$proxy_pid"
  stop "$redis_pid"
else
  record '{"label":"jwt-redis/skipped","reason":"redis-server is not installed"}'
fi

start_proxy hmac
measure hmac "$proxy_url" "$proxy_pid" --mode hmac
stop "$proxy_pid"

# --- streams at scale --------------------------------------------------------------------
# A mock of its own (long streams); for each count a fresh nginx and a fresh proxy, so that
# each row's peak RSS is its own. The proxy's row is run even when nginx cannot be.
"${on_load[@]}" "$loadgen" mock --sse-chunks "$scale_chunks" --sse-interval-us "$scale_interval_us" \
  >"$out/scale-mock.addr" &
scale_mock_pid=$!
pids+=("$scale_mock_pid")
for _ in $(seq 100); do [ -s "$out/scale-mock.addr" ] && break; sleep 0.05; done
scale_mock=$(head -1 "$out/scale-mock.addr")

# scale <row> <streams> <url> <pids> [loadgen streams options...]: one measurement.
scale() {
  local row=$1 n=$2 url=$3 pidlist=$4
  shift 4
  local pidargs=()
  for p in $pidlist; do pidargs+=(--pid "$p"); done
  local out
  out=$("${on_load[@]}" "$loadgen" streams --label "$row" --url "$url" "${pidargs[@]}" --streams "$n" \
    --ramp "$scale_ramp" --warmup "$scale_warmup" --duration "$scale_duration" "$@")
  record "$out"
}

for n in $stream_scales; do
  need_fds=$((2 * n + 256))
  if [ "$fd_limit" -lt "$need_fds" ]; then
    echo "bench: skipping $n concurrent streams: they need ulimit -n >= $need_fds, the hard limit here is" \
      "$fd_limit (raise it: limits.conf, systemd's LimitNOFILE, docker run --ulimit nofile=...)" >&2
    record "{\"label\":\"streams-$n-skipped\",\"streams\":$n,\"reason\":\"needs ulimit -n >= $need_fds, the hard limit is $fd_limit\"}"
    continue
  fi
  say "streams at scale: $n"
  if $smoke; then
    record "{\"label\":\"streams-$n-nginx-skipped\",\"reason\":\"smoke mode does not start nginx\"}"
  elif command -v nginx >/dev/null; then
    # Room beyond one client and one upstream connection per stream: with exactly that,
    # nginx warned "worker_connections are not enough, reusing connections" at 4,000 and
    # closed clients' keep-alive connections under them.
    nginx_conns=$((3 * n + 256))
    [ "$nginx_conns" -le "$((fd_limit - 64))" ] || nginx_conns=$((fd_limit - 64))
    start_nginx "streams-$n-nginx" "$scale_mock" "$nginx_conns"
    scale "streams-$n-nginx" "$n" "$nginx_url" "$nginx_pid $workers"
    stop "$nginx_pid"
  else
    record "{\"label\":\"streams-$n-nginx-skipped\",\"reason\":\"nginx is not installed\"}"
  fi
  start_proxy "streams-$n-proxy" API_KEY_SERVER_OPENAI_BASE_URL="http://$scale_mock/v1/chat/completions"
  scale "streams-$n-proxy" "$n" "$proxy_url" "$proxy_pid" --mode jwt --tokens "$out/tokens.txt"
  stop "$proxy_pid"
done
stop "$scale_mock_pid"

say "cold start"
cold=$("${on_load[@]}" "$loadgen" coldstart --runs "$cold_runs" -- "${on_proxy[@]}" "$bin")
record "$cold"

record "{\"label\":\"meta/end\",\"load_end\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
python3 bench/report.py "$results" --md "$md" --svg "$svg" $($smoke && echo --smoke)
if $smoke; then
  [ -n "${BENCH_SHOW:-}" ] && cat "$md"
  echo "bench: smoke run passed (${SECONDS}s)"
else
  cp "$results" bench/results.jsonl
  say "wrote $md, $svg and bench/results.jsonl"
fi
