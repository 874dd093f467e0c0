#!/usr/bin/env bash
# Runs every example against `api-key-server dev` and its built-in fake upstream:
# a venv with openai and httpx, the server on a free port, each example, then stops the
# server. Quiet on success; on failure prints the failing example's output and the
# server's log, and exits non-zero.
#
# Environment (all optional):
#   API_KEY_SERVER_BIN   the binary (default: the newer of target/release and target/debug;
#                        built with cargo when neither exists)
#   EXAMPLES_VENV        the venv directory (default target/examples-venv, reused)
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "examples/run-all.sh: $*" >&2
  exit 1
}

command -v python3 >/dev/null || fail "python3 is required"
command -v curl >/dev/null || fail "curl is required"

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

venv=${EXAMPLES_VENV:-target/examples-venv}
if ! "$venv/bin/python" -c 'import openai, httpx' >/dev/null 2>&1; then
  python3 -m venv "$venv" || fail "cannot create a venv in $venv (Debian: apt-get install python3-venv)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check openai httpx >"$venv.pip.log" 2>&1 ||
    { cat "$venv.pip.log" >&2; fail "pip install openai httpx failed"; }
fi

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# A clean environment: no OPENAI_API_KEY (the fake upstream answers, offline and free),
# no API_KEY_SERVER_* settings of the caller's; PORT=0 picks a free port.
env -i PATH="$PATH" HOME="${HOME:-/tmp}" PORT=0 RUST_LOG=warn "$bin" dev >"$work/server.log" 2>&1 &
server_pid=$!

banner() {
  sed -n "s/^$1=//p" "$work/server.log" | head -n 1
}
for _ in $(seq 1 150); do
  grep -q '^Ctrl-C' "$work/server.log" && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "api-key-server dev exited"; }
  sleep 0.2
done
url=$(banner URL)
[ -n "$url" ] || { cat "$work/server.log" >&2; fail "no banner from api-key-server dev"; }
curl -sS --fail --max-time 5 "$url/health" >/dev/null || fail "$url/health does not answer"

PROXY_URL=$url
PROXY_JWT=$(banner JWT)
PROXY_HMAC_CLIENT=$(banner HMAC_CLIENT)
PROXY_HMAC_SECRET=$(banner 'export DEV_HMAC_SECRET')
[ -n "$PROXY_JWT" ] && [ -n "$PROXY_HMAC_CLIENT" ] && [ -n "$PROXY_HMAC_SECRET" ] ||
  { cat "$work/server.log" >&2; fail "the dev banner lacks JWT, HMAC_CLIENT or DEV_HMAC_SECRET"; }
# The fake upstream echoes the prompt: this proves the reply made the whole trip.
PROXY_EXPECT="You said: Say hello"
PROXY_PRODUCT=demo
API_KEY_SERVER_BIN=$bin
export PROXY_URL PROXY_JWT PROXY_HMAC_CLIENT PROXY_HMAC_SECRET PROXY_EXPECT PROXY_PRODUCT API_KEY_SERVER_BIN

run() {
  local name=$1
  shift
  if ! "$@" >"$work/$name.out" 2>&1; then
    echo "examples/run-all.sh: $name failed:" >&2
    cat "$work/$name.out" >&2
    echo "--- server log ---" >&2
    cat "$work/server.log" >&2
    exit 1
  fi
}
run chat_jwt "$venv/bin/python" examples/python/chat_jwt.py
run chat_hmac "$venv/bin/python" examples/python/chat_hmac.py
run curl bash examples/curl.sh

kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=
[ "$status" = 0 ] || { cat "$work/server.log" >&2; fail "api-key-server dev exited with $status after SIGTERM"; }
