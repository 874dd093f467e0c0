#!/usr/bin/env bash
# Redis's own CPU per call of each Redis script of the request path, measured alone: no
# proxy, no HTTP, one redis-server on CPU 1 and redis-benchmark on CPU 0. What it shows is
# where a request's Redis work goes (docs/benchmarks.md, "Budgets"): the round trip of any
# script call, the limiter's script, and a budget reservation with its settlement.
#
#   bench/redis-scripts.sh [CALLS]     (default 40000 calls per row, 3 rounds; about 1 min)
#   bench/redis-scripts.sh 500         what CI runs: keeps the script working
#
# CPU is read from INFO cpu (user + sys) before and after each row, so time the process
# spent preempted does not count (commandstats' usec does count it). Each reservation has
# a new id in one scope, as a busy user's do. Only 127.0.0.1 is contacted; every row is
# bounded by its call count.
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-40000}
for tool in redis-server redis-cli redis-benchmark taskset nproc python3; do
  command -v "$tool" >/dev/null || { echo "redis-scripts.sh: $tool is needed (apt-get install redis-server util-linux python3)" >&2; exit 2; }
done

# Pinned apart when there are two CPUs or more; on one, both share it (the figures then
# include more switching, but the script still runs).
pin() {
  if [ "$(nproc)" -ge 2 ]; then taskset -c "$@"; else shift; "$@"; fi
}

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pin 1 redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$work/redis.pid" --logfile "$work/redis.log" >/dev/null
trap 'kill "$(cat "$work/redis.pid")" 2>/dev/null; rm -rf "$work"' EXIT
cli() { redis-cli -p "$port" "$@"; }
for _ in $(seq 100); do cli ping >/dev/null 2>&1 && break; sleep 0.05; done

# The scripts as the server sends them (src/limit, src/budget), and the pair: a
# reservation, then its settlement, in one call.
budget=src/budget
{ echo 'return 1'; } >"$work/round-trip.lua"
cp src/limit/bucket.lua "$work/limiter.lua"
{
  cat "$budget/common.lua"
  echo 'local function reserve(KEYS, ARGV)'; cat "$budget/reserve.lua"; echo 'end'
  echo 'local function settle(KEYS, ARGV)'; cat "$budget/settle.lua"; echo 'end'
  echo 'reserve(KEYS, ARGV)'
  echo "return settle(KEYS, {ARGV[1], '700', ARGV[4], ARGV[5], ARGV[6]})"
} >"$work/reserve-settle.lua"

now=$(date +%s)
cpu() { cli info cpu | awk -F: '/used_cpu_(user|sys):/ { s += $2 } END { printf "%.6f", s }'; }
args() {
  case $1 in
    round-trip) echo 0 ;;
    limiter) echo "3 {u}b {u}d1 {u}d2 1000000000 1000000000 1000000000000 $((now + 86400)) $((now + 172800))" ;;
    reserve-settle) echo "2 {u}h {u}z i-__rand_int__ 1000 100000000000000 $now $((now + 3600)) $((now + 90000))" ;;
  esac
}
for round in 1 2 3; do
  for row in round-trip limiter reserve-settle; do
    cli flushall >/dev/null
    sha=$(cli script load "$(cat "$work/$row.lua")")
    # One call first: a script that fails would only measure its error.
    # shellcheck disable=SC2046 # the arguments are words on purpose
    answer=$(cli evalsha "$sha" $(args "$row" | sed 's/__rand_int__/check/'))
    case $answer in
      ERR* | *error*) echo "redis-scripts.sh: $row failed: $answer" >&2; exit 1 ;;
    esac
    before=$(cpu)
    # shellcheck disable=SC2046 # the arguments are words on purpose
    pin 0 redis-benchmark -p "$port" -n "$calls" -c 4 -r 100000000 -q evalsha "$sha" $(args "$row") >/dev/null 2>&1
    after=$(cpu)
    python3 -c "import sys; print(f'round {sys.argv[1]}  {sys.argv[2]:<15} {(float(sys.argv[4]) - float(sys.argv[3])) / int(sys.argv[5]) * 1e6:6.1f} us of Redis CPU per call')" \
      "$round" "$row" "$before" "$after" "$calls"
  done
done
