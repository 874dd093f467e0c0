#!/usr/bin/env bash
# The hand-written parts that replaced a library for speed (router, log line, timestamp,
# upstream pool), each against the library it replaced: `benches/replaced.rs`, built with
# the release profile, run variant after variant in turn (A, B, A, B...) for ROUNDS
# rounds. Prints a Markdown table (docs/benchmarks.md, "The hand-written parts against
# their libraries").
#
# The first figure is instructions per operation from `valgrind --tool=callgrind`, which
# do not move with the machine's load: each variant runs N1 and N2 iterations, and
# (total(N2) - total(N1)) / (N2 - N1) leaves the start-up out. The second is the wall
# time per operation of a native run of the same binary, which does move with the load.
#
#   bench/replaced.sh             # ROUNDS=3, about 5 minutes once built
#   ROUNDS=1 bench/replaced.sh    # quicker, one sample per variant
#   REQUEST_INSTRUCTIONS=65000    # a request's user-space instructions, for the "% of a
#                                 # request" column (docs/benchmarks.md, "Where the time goes")
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REQUEST_INSTRUCTIONS=${REQUEST_INSTRUCTIONS:-65000}
command -v valgrind >/dev/null || { echo "replaced.sh: valgrind is needed" >&2; exit 2; }

echo "building benches/replaced.rs (release profile)..." >&2
bin=$(cargo bench --locked --bench replaced --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "replaced" and m.get("executable"):
        print(m["executable"])')
[ -x "$bin" ] || { echo "replaced.sh: the build failed (cargo bench --bench replaced --no-run)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset RUST_LOG

# part: variants (hand-written first, the baseline last when there is one), N1, N2, native N
parts=(
    "router|router/by-hand router/axum router/none|2000|22000|500000"
    "log|log/direct log/tracing log/text log/off|2000|12000|200000"
    "time|time/jiff time/tracing-subscriber time/time-crate|2000|22000|1000000"
    "pool|pool/by-hand pool/legacy-client|200|1200|20000"
)

# Instructions of `run VARIANT N` (all threads of the process; the mock is another).
instructions() {
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$bin" run "$1" "$2" \
        >/dev/null 2>"$work/cg.err" || { cat "$work/cg.err" >&2; exit 1; }
    awk '/^summary:/ {print $2}' "$work/cg.out"
}

# Wall nanoseconds per iteration of a native `run VARIANT N`.
wall() {
    "$bin" run "$1" "$2" 2>&1 >/dev/null | sed -n 's/.*iterations, \([0-9.]*\) ns each/\1/p'
}

results="$work/results"
: >"$results"
for round in $(seq 1 "$ROUNDS"); do
    for spec in "${parts[@]}"; do
        IFS='|' read -r part variants n1 n2 native <<<"$spec"
        for variant in $variants; do
            t1=$(instructions "$variant" "$n1")
            t2=$(instructions "$variant" "$n2")
            ns=$(wall "$variant" "$native")
            echo "$round $variant $n1 $t1 $n2 $t2 $ns" >>"$results"
            echo "round $round/$ROUNDS: $variant $(( (t2 - t1) / (n2 - n1) )) instructions, $ns ns" >&2
        done
    done
done

load=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$results" "$REQUEST_INSTRUCTIONS" "$ROUNDS" "$load" <<'EOF'
import statistics, sys

path, request, rounds, load = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
per_op, wall, order = {}, {}, []
for line in open(path):
    _, variant, n1, t1, n2, t2, ns = line.split()
    if variant not in per_op:
        order.append(variant)
    per_op.setdefault(variant, []).append((int(t2) - int(t1)) / (int(n2) - int(n1)))
    wall.setdefault(variant, []).append(float(ns))

baseline = {"router": "router/none", "log": "log/off"}
print(f"Instructions per operation (callgrind; median of {rounds} alternating rounds, min-max) "
      f"and wall time per operation (native, median; load average at the end: {load}).")
print()
print("| Variant | instructions/op | range | net of the baseline | vs hand-written (net) "
      "| saved per request | % of a request | wall ns/op |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for variant in order:
    part = variant.split("/")[0]
    hand = next(v for v in order if v.startswith(part + "/"))
    base = baseline.get(part)
    med = statistics.median(per_op[variant])
    lo, hi = min(per_op[variant]), max(per_op[variant])
    base_med = statistics.median(per_op[base]) if base else 0
    hand_net = statistics.median(per_op[hand]) - base_med
    net = med - base_med
    is_base = variant == base
    ratio = "" if is_base or variant == hand or hand_net <= 0 else f"{net / hand_net:.2f}x"
    saved = "" if is_base or variant == hand else f"{net - hand_net:,.0f}"
    share = "" if is_base or variant == hand else f"{100 * (net - hand_net) / request:.1f} %"
    print(f"| {variant} | {med:,.0f} | {lo:,.0f}-{hi:,.0f} | {'' if is_base else f'{net:,.0f}'} "
          f"| {ratio} | {saved} | {share} | {statistics.median(wall[variant]):,.1f} |")
print()
print(f"Net of the baseline: minus router/none (build the request, call the handler) or "
      f"log/off (request id and metrics, the line filtered out). Saved per request: the "
      f"library's net instructions minus the hand-written part's; % of a request: of "
      f"{request:,} instructions (docs/benchmarks.md).")
EOF
