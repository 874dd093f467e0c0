#!/usr/bin/env bash
# Runs every example against the real binary: the official OpenAI SDKs for Python (a venv
# with openai and httpx) and Node (openai@6 in a folder under target/), and curl.
#
# What it starts, all on 127.0.0.1 and free ports, all stopped at the end:
#   main      `api-key-server dev` and its built-in fake upstream: plain, streamed, HMAC,
#             the Responses API and embeddings
#   limited   two `dev` instances (Python's, Node's) with a 1-request bucket refilled at
#             0.5/s and a daily quota of 2: the 429 examples
#   badkey    `dev` with OPENAI_API_KEY set and an upstream that answers 401:
#             upstream_auth_failed
#   serve     the proxy in `serve` mode trusting the public key of a product backend
#             (examples/python/product_backend.py) that mints 6-second tokens: the
#             token-refresh examples
#   budget    `dev` with a $0.001 daily budget per user: the budget_exceeded examples
# Quiet on success; on failure prints the failing example's output and the servers'
# logs, and exits non-zero.
#
# Environment (all optional):
#   API_KEY_SERVER_BIN   the binary (default: the newer of target/release and target/debug;
#                        built with cargo when neither exists)
#   EXAMPLES_VENV        the venv directory (default target/examples-venv, reused)
#   EXAMPLES_NODE        the npm folder (default target/examples-node, reused)
#   EXAMPLES_VERBOSE     non-empty: print each example's output
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "examples/run-all.sh: $*" >&2
  exit 1
}

command -v python3 >/dev/null || fail "python3 is required"
command -v curl >/dev/null || fail "curl is required"
command -v openssl >/dev/null || fail "openssl is required (Debian: apt-get install openssl)"
command -v npm >/dev/null && node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' ||
  fail "Node.js 20 or later with npm is required"

bin=${API_KEY_SERVER_BIN:-}
if [ -z "$bin" ]; then
  release=target/release/api-key-server
  debug=target/debug/api-key-server
  if [ -x "$release" ] && { [ ! -x "$debug" ] || [ "$release" -nt "$debug" ]; }; then
    bin=$release
  else
    [ -x "$debug" ] || cargo build --quiet --locked
    bin=$debug
  fi
fi
[ -x "$bin" ] || fail "no binary at $bin"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

# The SDKs, pinned to the major versions the examples are written for.
venv=${EXAMPLES_VENV:-target/examples-venv}
python_sdk_ok='import openai, httpx; assert openai.__version__.startswith("3.") and httpx.__version__.startswith("0.28.")'
if ! "$venv/bin/python" -c "$python_sdk_ok" >/dev/null 2>&1; then
  python3 -m venv "$venv" || fail "cannot create a venv in $venv (Debian: apt-get install python3-venv)"
  # `python -m pip`, not bin/pip: a venv copied from elsewhere keeps the old path in pip's #!.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'openai==3.*' 'httpx==0.28.*' \
    >"$venv.pip.log" 2>&1 || { cat "$venv.pip.log" >&2; fail "pip install openai httpx failed"; }
fi
python=$venv/bin/python

# Node 20 takes openai 6.x (7.x needs Node 22). The examples are CommonJS so that
# NODE_PATH finds the package here, outside the source tree.
node_dir=${EXAMPLES_NODE:-target/examples-node}
mkdir -p "$node_dir"
node_dir=$(cd "$node_dir" && pwd)
# The installed version is read from the package's file: openai 6 does not export
# `openai/package.json`, so `require` cannot reach it (the install would run every time).
if ! node -e 'const v = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).version; process.exit(v.startsWith("6.") ? 0 : 1)' \
  "$node_dir/node_modules/openai/package.json" >/dev/null 2>&1; then
  npm install --prefix "$node_dir" --no-save --no-audit --no-fund --loglevel=error 'openai@6' \
    >"$node_dir.npm.log" 2>&1 || { cat "$node_dir.npm.log" >&2; fail "npm install openai@6 failed"; }
fi
export NODE_PATH=$node_dir/node_modules

work=$(mktemp -d)
declare -A pid=()
cleanup() {
  for name in "${!pid[@]}"; do
    kill -TERM "${pid[$name]}" 2>/dev/null || true
  done
  for name in "${!pid[@]}"; do
    wait "${pid[$name]}" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

logs() {
  for log in "$work"/*.log; do
    echo "--- $(basename "$log" .log) log ---" >&2
    cat "$log" >&2
  done
}

# start NAME COMMAND...: runs COMMAND in the background, its output in $work/NAME.log.
start() {
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 &
  pid[$name]=$!
}

# start_dev NAME [VAR=value...]: `api-key-server dev` in a clean environment (no
# OPENAI_API_KEY, no API_KEY_SERVER_* of the caller's) plus the given variables.
start_dev() {
  local name=$1
  shift
  start "$name" env -i PATH="$PATH" HOME="${HOME:-/tmp}" PORT=0 RUST_LOG=warn "$@" "$bin" dev
}

# wait_for NAME PATTERN: until NAME's log has a line matching PATTERN (at most 30 s).
wait_for() {
  for _ in $(seq 1 150); do
    grep -q "$2" "$work/$1.log" && return 0
    kill -0 "${pid[$1]}" 2>/dev/null || { logs; fail "$1 exited"; }
    sleep 0.2
  done
  logs
  fail "$1 did not start within 30 s"
}

# value NAME KEY: the value of the first `KEY=value` line in NAME's log.
value() {
  sed -n "s/^$2=//p" "$work/$1.log" | head -n 1
}

# A product backend's key pair: the backend signs with the private half, the proxy in
# serve mode trusts the public half.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/backend.pem" 2>/dev/null ||
  fail "openssl cannot generate an RSA key"
openssl pkey -in "$work/backend.pem" -pubout -out "$work/backend.pub.pem"

start fake python3 examples/support/fake_upstream.py
start fake401 python3 examples/support/fake_upstream.py --status 401
# A user with a $0.001 daily budget: a short request fits, a 2,048-token one cannot.
start_dev budget API_KEY_SERVER_DAILY_BUDGET_USD=0.001 \
  API_KEY_SERVER_MODEL_PRICES='{"gpt-4o":{"input":2.5,"output":10},"gpt-4o-mini":{"input":0.15,"output":0.6},"partner-chat-mini":{"input":0.15,"output":0.6},"text-embedding-3-small":{"input":0.02},"text-embedding-3-large":{"input":0.13}}'
start_dev main
limits=(API_KEY_SERVER_RATE_LIMIT_CAPACITY=1 API_KEY_SERVER_RATE_LIMIT_REFILL_PER_SECOND=0.5 API_KEY_SERVER_DAILY_QUOTA=2)
start_dev limited_python "${limits[@]}"
start_dev limited_node "${limits[@]}"
start backend env API_KEY_SERVER_BIN="$bin" python3 examples/python/product_backend.py \
  --key "$work/backend.pem" --kid backend-1 --product demo --ttl 6

wait_for fake401 '^URL='
start_dev badkey OPENAI_API_KEY=sk-example-refused-by-the-upstream \
  API_KEY_SERVER_OPENAI_BASE_URL="$(value fake401 URL)"
wait_for fake '^URL='
start serve env -i PATH="$PATH" PORT=0 \
  API_KEY_SERVER_PRODUCT_KEYS='{"demo":"sk-example-fake-upstream"}' \
  API_KEY_SERVER_JWT_PUBLIC_KEYS="$(python3 -c 'import json, sys; print(json.dumps({"backend-1": open(sys.argv[1]).read()}))' "$work/backend.pub.pem")" \
  API_KEY_SERVER_OPENAI_BASE_URL="$(value fake URL)" \
  "$bin" serve

for name in main limited_python limited_node badkey budget; do
  wait_for "$name" '^Ctrl-C'
  [ -n "$(value "$name" URL)" ] && [ -n "$(value "$name" JWT)" ] || { logs; fail "no URL or JWT in $name's banner"; }
done
wait_for serve '"listening"'
# The JSON log line `listening` names the bound address (0.0.0.0:PORT in serve mode).
serve_port=$(sed -n '/"listening"/ s/.*"address":"[^"]*:\([0-9]*\)".*/\1/p' "$work/serve.log" | head -n 1)
[ -n "$serve_port" ] || { logs; fail "no address in the serve log's listening line"; }
serve_url=http://127.0.0.1:$serve_port
wait_for backend '^URL='
curl -sS --fail --max-time 5 "$(value main URL)/health" >/dev/null || fail "the dev proxy's /health does not answer"
curl -sS --fail --max-time 5 "$serve_url/health" >/dev/null || fail "$serve_url/health does not answer"

PROXY_URL=$(value main URL)
PROXY_JWT=$(value main JWT)
PROXY_HMAC_CLIENT=$(value main HMAC_CLIENT)
PROXY_HMAC_SECRET=$(value main 'export DEV_HMAC_SECRET')
[ -n "$PROXY_HMAC_CLIENT" ] && [ -n "$PROXY_HMAC_SECRET" ] ||
  { logs; fail "the dev banner lacks HMAC_CLIENT or DEV_HMAC_SECRET"; }
# The fake upstreams echo the prompt: this proves the reply made the whole trip.
PROXY_EXPECT="You said: Say hello"
PROXY_PRODUCT=demo
API_KEY_SERVER_BIN=$bin
export PROXY_URL PROXY_JWT PROXY_HMAC_CLIENT PROXY_HMAC_SECRET PROXY_EXPECT PROXY_PRODUCT API_KEY_SERVER_BIN

# The error examples: a limited proxy each (their quotas get used up), one badkey proxy.
badkey_env=(PROXY_BADKEY_URL="$(value badkey URL)" PROXY_BADKEY_JWT="$(value badkey JWT)"
  PROXY_BADKEY_UPSTREAM_REQUESTS="$(value fake401 URL | sed 's|/v1/chat/completions$|/requests|')")
# The token-refresh examples: the serve-mode proxy and the backend; 6 s tokens, refreshed
# with less than 3 s left, so each example waits about 3 s.
refresh_env=(PROXY_URL="$serve_url" BACKEND_URL="$(value backend URL)"
  BACKEND_SESSION=demo-session-of-user-42 REFRESH_MARGIN_SECONDS=3)
# The budget examples: both share the dev proxy's one user and its budget; each short
# request costs a few 1e-6 USD, so the long one is refused either way.
budget_env=(PROXY_BUDGET_URL="$(value budget URL)" PROXY_BUDGET_JWT="$(value budget JWT)")

# run NAME COMMAND...: runs one example, at most 2 minutes (an SDK that wrongly honoured
# a daily quota's Retry-After would sleep until midnight).
run() {
  local name=$1 status=0
  shift
  timeout 120 "$@" >"$work/$name.out" 2>&1 || status=$?
  if [ "$status" != 0 ]; then
    [ "$status" = 124 ] && echo "(timed out after 120 s)" >>"$work/$name.out"
    echo "examples/run-all.sh: $name failed:" >&2
    cat "$work/$name.out" >&2
    logs
    exit 1
  fi
  if [ -n "${EXAMPLES_VERBOSE:-}" ]; then
    echo "--- $name ---"
    cat "$work/$name.out"
  fi
}
run python_chat_jwt "$python" examples/python/chat_jwt.py
run python_chat_hmac "$python" examples/python/chat_hmac.py
run python_responses_jwt "$python" examples/python/responses_jwt.py
run python_errors env PROXY_LIMITED_URL="$(value limited_python URL)" PROXY_LIMITED_JWT="$(value limited_python JWT)" \
  "${badkey_env[@]}" "$python" examples/python/errors.py
run python_desktop_client env "${refresh_env[@]}" "$python" examples/python/desktop_client.py
run python_budget env "${budget_env[@]}" "$python" examples/python/budget.py
run node_chat_jwt node examples/node/chat_jwt.js
run node_chat_hmac node examples/node/chat_hmac.js
run node_responses_jwt node examples/node/responses_jwt.js
run node_errors env PROXY_LIMITED_URL="$(value limited_node URL)" PROXY_LIMITED_JWT="$(value limited_node JWT)" \
  "${badkey_env[@]}" node examples/node/errors.js
run node_desktop_client env "${refresh_env[@]}" node examples/node/desktop_client.js
run node_budget env "${budget_env[@]}" node examples/node/budget.js
run curl bash examples/curl.sh

kill -TERM "${pid[main]}"
status=0
wait "${pid[main]}" || status=$?
unset 'pid[main]'
[ "$status" = 0 ] || { logs; fail "api-key-server dev exited with $status after SIGTERM"; }
