#!/usr/bin/env python3
"""Turns bench/run.sh's results (one JSON object per line) into the Markdown tables of
docs/benchmarks.md (between its result markers) and the SVG chart beside it.

Fails (exit 1) when any measured request was not answered 200: the figures of a run with
errors would price the wrong thing. The streams-at-scale rows are the exception outside
smoke runs: their errors are one of the figures (a target), shown in the stream table."""

import argparse
import html
import json
import sys

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"

ROWS = [
    ("direct", "direct to the mock upstream"),
    ("nginx", "nginx `proxy_pass`, adds the key"),
    ("jwt-memory", "proxy: JWT (tokens in rotation, cached), in-memory limits"),
    ("jwt-responses", "proxy: JWT, Responses API"),
    ("jwt-embeddings", "proxy: JWT, embeddings"),
    ("jwt-new", "proxy: JWT, every token new (RSA verify each)"),
    ("jwt-budget", "proxy: JWT, budgets on (never refusing), in memory"),
    ("jwt-redis", "proxy: JWT (cached), Redis limits"),
    ("jwt-redis-budget", "proxy: JWT, Redis limits and budgets (never refusing)"),
    ("hmac", "proxy: HMAC, fresh nonce each, in-memory limits"),
]
PROXY_ROWS = ["jwt-memory", "jwt-new", "jwt-redis", "hmac"]
# Streams at scale: labels `streams-<count>-<side>` (and `-skipped`, `/idle`).
SCALE_SIDES = [("nginx", "nginx"), ("proxy", "proxy (JWT)")]


def fmt(value, digits=0, suffix=""):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(value):
    return "–" if value is None else f"{value:.2f}×"


def mib(kib):
    return None if kib is None else kib / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--md", required=True)
    parser.add_argument("--svg", required=True)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()

    by_label = {}
    with open(args.results) as f:
        for line in f:
            line = line.strip()
            if line:
                item = json.loads(line)
                by_label[item["label"]] = item

    bad = [r for r in by_label.values() if r.get("errors") and (args.smoke or "streams" not in r)]
    if bad:
        for r in bad:
            print(f"bench: {r['label']}: {r['errors']} requests failed of {r.get('requests', r.get('completed'))} "
                  f"(first: {r.get('first_error')})", file=sys.stderr)
        sys.exit(1)
    empty = [r["label"] for r in by_label.values() if "requests" in r and not r["requests"]]
    empty += [r["label"] for r in by_label.values() if "chunks" in r and not r["chunks"]]
    if empty:
        print(f"bench: no request completed in: {', '.join(empty)}", file=sys.stderr)
        sys.exit(1)

    meta = by_label.get("meta", {})
    end = by_label.get("meta/end", {})
    get = lambda label, key: by_label.get(label, {}).get(key)  # noqa: E731
    direct_rps, nginx_rps = get("direct", "rps"), get("nginx", "rps")
    nginx_cpu = get("nginx", "cpu_us_per_request")

    out = []
    out.append(f"Run of {meta.get('date', '?')} on {meta.get('cpu', '?')} ({meta.get('cpus', '?')} CPUs), "
               f"{meta.get('os', '?')}, kernel {meta.get('kernel', '?')}; {meta.get('rustc', '?')}; "
               f"{meta.get('nginx', '?')}; {meta.get('redis', '?')}. Pinning: {meta.get('pinning', '?')}. "
               f"Load average (1, 5, 15 min) at the start: {meta.get('load_start', '?')}, "
               f"at the end: {end.get('load_end', '?')}.")
    if args.smoke:
        out.append("")
        out.append("**Smoke run: debug binaries and a fraction of a second per row. These figures mean nothing.**")
    out.append("")
    conns = get("jwt-memory", "connections") or get("direct", "connections")
    out.append(f"### Requests at {conns} concurrent connections")
    out.append("")
    out.append("| Row | req/s | vs nginx | vs direct | CPU µs/req | CPU vs nginx | p50 ms | p99 ms | p99.9 ms "
               "| added p50 / p99 µs at 1 conn. | idle RSS MiB | peak RSS MiB |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    direct_c1 = by_label.get("direct/c1", {})
    for row, name in ROWS:
        r = by_label.get(row)
        if r is None:
            skipped = by_label.get(f"{row}/skipped")
            if skipped:
                out.append(f"| {name} | skipped: {skipped['reason']} | | | | | | | | | | |")
            continue
        c1 = by_label.get(f"{row}/c1", {})
        if row == "direct":
            added = "(p50 {} / p99 {})".format(fmt(c1.get("p50_us")), fmt(c1.get("p99_us")))
        elif c1:
            added = "{} / {}".format(fmt(c1["p50_us"] - direct_c1.get("p50_us", 0)),
                                     fmt(c1["p99_us"] - direct_c1.get("p99_us", 0)))
        else:
            added = "–"
        peak = max([x for x in [r.get("peak_rss_kib"), c1.get("peak_rss_kib")] if x is not None], default=None)
        out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            name, fmt(r["rps"]), fmt_ratio(ratio(r["rps"], nginx_rps)), fmt_ratio(ratio(r["rps"], direct_rps)),
            fmt(r.get("cpu_us_per_request"), 1), fmt_ratio(ratio(r.get("cpu_us_per_request"), nginx_cpu)),
            fmt(r["p50_us"] / 1000, 3), fmt(r["p99_us"] / 1000, 3), fmt(r["p999_us"] / 1000, 3), added,
            fmt(mib(get(f"{row}/idle", "rss_kib")), 1), fmt(mib(peak), 1)))
    out.append("")
    out.append("CPU µs/req is the measured process's own CPU time (all threads, from `/proc/<pid>/task/*/schedstat`) "
               "over the measured window divided by the requests answered in it; for the direct row it is the mock's. "
               "For nginx it covers master and worker; RSS figures for nginx add both processes.")
    out.append("")

    out.append("### Streaming (Server-Sent Events, 4 connections)")
    out.append("")
    out.append("| Row | first chunk p50 µs | first chunk p99 µs | added first chunk p99 µs | gap p50 µs | gap p99 µs "
               "| added gap p50 µs |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ds = by_label.get("direct/stream", {})
    for row, name in ROWS:
        s = by_label.get(f"{row}/stream")
        if not s:
            continue
        added_first = None if row == "direct" else s["first_chunk_p99_us"] - ds.get("first_chunk_p99_us", 0)
        added_gap = None if row == "direct" else s["gap_p50_us"] - ds.get("gap_p50_us", 0)
        out.append(f"| {name} | {fmt(s['first_chunk_p50_us'])} | {fmt(s['first_chunk_p99_us'])} | {fmt(added_first)} "
                   f"| {fmt(s['gap_p50_us'])} | {fmt(s['gap_p99_us'])} | {fmt(added_gap)} |")
    out.append("")

    scale_targets = stream_table(out, by_label)

    cold = by_label.get("coldstart", {})
    out.append(f"Cold start (process start to the first 200 from `/healthz`, {cold.get('runs', '?')} runs, "
               f"through `taskset`): median {fmt(cold.get('median_ms'), 1)} ms, min {fmt(cold.get('min_ms'), 1)} ms, "
               f"max {fmt(cold.get('max_ms'), 1)} ms.")
    out.append("")

    # Targets.
    jm, jr, hm = by_label.get("jwt-memory", {}), by_label.get("jwt-redis", {}), by_label.get("hmac", {})
    targets = []

    def target(name, value, limit, ok):
        targets.append((name, value, limit, ok))

    rps_ratio = ratio(jm.get("rps"), nginx_rps)
    target("JWT + memory: req/s vs nginx", fmt_ratio(rps_ratio), "≥ 0.90×", rps_ratio is not None and rps_ratio >= 0.9)
    cpu_ratio = ratio(jm.get("cpu_us_per_request"), nginx_cpu)
    target("JWT + memory: CPU per request vs nginx", fmt_ratio(cpu_ratio), "≤ 1.10×",
           cpu_ratio is not None and cpu_ratio <= 1.1)
    added_p99 = None
    if "jwt-memory/c1" in by_label and direct_c1:
        added_p99 = by_label["jwt-memory/c1"]["p99_us"] - direct_c1["p99_us"]
    target("JWT + memory: added p99 at 1 connection", fmt(added_p99, 0, " µs"), "≤ 150 µs",
           added_p99 is not None and added_p99 <= 150)
    redis_ratio = ratio(jr.get("rps"), jm.get("rps"))
    target("JWT + Redis: req/s vs JWT + memory", fmt_ratio(redis_ratio), "≥ 0.60×",
           redis_ratio is not None and redis_ratio >= 0.6)
    jb, jrb = by_label.get("jwt-budget", {}), by_label.get("jwt-redis-budget", {})
    budget_ratio = ratio(jb.get("rps"), jm.get("rps"))
    target("Budgets, memory: req/s vs JWT + memory", fmt_ratio(budget_ratio), "≥ 0.90×",
           budget_ratio is not None and budget_ratio >= 0.9)
    redis_budget_ratio = ratio(jrb.get("rps"), jr.get("rps"))
    target("Budgets, Redis: req/s vs JWT + Redis", fmt_ratio(redis_budget_ratio), "≥ 0.90×",
           redis_budget_ratio is not None and redis_budget_ratio >= 0.9)
    hmac_ratio = ratio(hm.get("rps"), jm.get("rps"))
    target("HMAC: req/s vs JWT + memory", fmt_ratio(hmac_ratio), "≥ 0.80×", hmac_ratio is not None and hmac_ratio >= 0.8)
    idle = [get(f"{r}/idle", "rss_kib") for r in PROXY_ROWS if get(f"{r}/idle", "rss_kib")]
    worst_idle = mib(max(idle)) if idle else None
    target("Idle RSS (largest proxy row)", fmt(worst_idle, 1, " MiB"), "≤ 10 MiB",
           worst_idle is not None and worst_idle <= 10)
    peaks = [max(get(r, "peak_rss_kib") or 0, get(f"{r}/c1", "peak_rss_kib") or 0) for r in PROXY_ROWS
             if r != "hmac" and r in by_label]
    worst_peak = mib(max(peaks)) if peaks else None
    target("Peak RSS (proxy rows but HMAC)", fmt(worst_peak, 1, " MiB"), "≤ 32 MiB",
           worst_peak is not None and worst_peak <= 32)
    hmac_peak = mib(max(get("hmac", "peak_rss_kib") or 0, get("hmac/c1", "peak_rss_kib") or 0))
    target("Peak RSS, HMAC row (nonce store grows with the rate)", fmt(hmac_peak, 1, " MiB"), "reported", None)
    target("Cold start (median)", fmt(cold.get("median_ms"), 1, " ms"), "≤ 20 ms",
           cold.get("median_ms") is not None and cold["median_ms"] <= 20)
    js = by_label.get("jwt-memory/stream")
    added_first = js["first_chunk_p99_us"] - ds["first_chunk_p99_us"] if js and ds else None
    target("Streaming: added time to first chunk, p99", fmt(added_first, 0, " µs"), "≤ 1000 µs",
           added_first is not None and added_first <= 1000)
    added_gap = js["gap_p50_us"] - ds["gap_p50_us"] if js and ds else None
    target("Streaming: added gap between chunks, p50", fmt(added_gap, 0, " µs"), "≤ 100 µs",
           added_gap is not None and added_gap <= 100)

    targets.extend(scale_targets)

    out.append("### Targets (ratios from this one run)")
    out.append("")
    out.append("| Target | Measured | Goal | Met |")
    out.append("| --- | ---: | ---: | :---: |")
    for name, value, limit, ok in targets:
        mark = "–" if ok is None else ("yes" if ok else "**no**")
        out.append(f"| {name} | {value} | {limit} | {mark} |")
    out.append("")
    svg_name = args.svg.rsplit("/", 1)[-1]
    out.append(f"![Requests per second and CPU per request by row]({svg_name})")

    write_md(args.md, "\n".join(out))
    write_svg(args.svg, by_label)


def stream_table(out, by_label):
    """The streams-at-scale table; returns its targets (name, value, goal, met)."""
    counts = sorted({int(label.split("-")[1]) for label in by_label
                     if label.startswith("streams-") and label.split("-")[1].isdigit()})
    if not counts:
        return []
    get = lambda label, key: by_label.get(label, {}).get(key)  # noqa: E731

    def per_stream_kib(row, n):
        peak, idle = get(row, "peak_rss_kib"), get(f"{row}/idle", "rss_kib")
        return None if peak is None or idle is None else (peak - idle) / n

    out.append("### Streams at scale (50 chunks 100 ms apart per stream)")
    out.append("")
    out.append("| Streams | Row | RSS per stream KiB | vs nginx | CPU µs per chunk | vs nginx | first chunk p50 ms "
               "| first chunk p99 ms | vs nginx | gap p99 ms | streams done | errors |")
    out.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    targets = []
    for n in counts:
        skipped = by_label.get(f"streams-{n}-skipped")
        if skipped:
            out.append(f"| {n:,} | skipped: {skipped['reason']} | | | | | | | | | | |")
            continue
        nginx = f"streams-{n}-nginx"
        for side, name in SCALE_SIDES:
            row = f"streams-{n}-{side}"
            r = by_label.get(row)
            if r is None:
                reason = get(f"{row}-skipped", "reason")
                if reason:
                    out.append(f"| {n:,} | {name}: skipped, {reason} | | | | | | | | | | |")
                continue
            kib = per_stream_kib(row, n)
            ms = lambda key: None if r.get(key) is None else r[key] / 1000  # noqa: E731
            out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                f"{n:,}", name, fmt(kib, 1), fmt_ratio(ratio(kib, per_stream_kib(nginx, n))),
                fmt(r.get("cpu_us_per_chunk"), 2), fmt_ratio(ratio(r.get("cpu_us_per_chunk"),
                                                                   get(nginx, "cpu_us_per_chunk"))),
                fmt(ms("first_chunk_p50_us"), 2), fmt(ms("first_chunk_p99_us"), 2),
                fmt_ratio(ratio(r.get("first_chunk_p99_us"), get(nginx, "first_chunk_p99_us"))),
                fmt(ms("gap_p99_us"), 1), fmt(r.get("completed")), fmt(r.get("errors"))))
        proxy = f"streams-{n}-proxy"
        if proxy in by_label:
            rss = ratio(per_stream_kib(proxy, n), per_stream_kib(nginx, n))
            targets.append((f"{n:,} streams: RSS per stream vs nginx", fmt_ratio(rss), "≤ 1.00×",
                            None if rss is None else rss <= 1.0))
            cpu = ratio(get(proxy, "cpu_us_per_chunk"), get(nginx, "cpu_us_per_chunk"))
            targets.append((f"{n:,} streams: CPU per chunk vs nginx", fmt_ratio(cpu), "≤ 1.00×",
                            None if cpu is None else cpu <= 1.0))
            if n == 4000:
                first = ratio(get(proxy, "first_chunk_p99_us"), get(nginx, "first_chunk_p99_us"))
                targets.append((f"{n:,} streams: first chunk p99 vs nginx", fmt_ratio(first), "≤ 2.00×",
                                None if first is None else first <= 2.0))
            errors = get(proxy, "errors")
            targets.append((f"{n:,} streams: errors (proxy)", fmt(errors), "0", errors == 0))
    out.append("")
    out.append("RSS per stream is the row's peak RSS (VmHWM, at the end of the measured window) minus its RSS "
               "before the first request, divided by the streams; nginx adds master and worker. CPU per chunk is "
               "the process's CPU time over the measured window divided by the chunks the generator received in "
               "it. Each count runs a fresh nginx and a fresh proxy. Errors count every answer other than 200 and "
               "every broken connection, warm-up included.")
    out.append("")
    return targets


def write_md(path, body):
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{body}\n{END}{tail}")


def write_svg(path, by_label):
    rows = [(name, by_label[row]) for row, name in ROWS if row in by_label]
    names = [html.escape(n.replace("`", "")) for n, _ in rows]
    bar_h, gap, left, width = 22, 10, 330, 300
    panel_h = len(rows) * (bar_h + gap) + 40
    height = 2 * panel_h + 20
    total_w = left + width + 150
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{total_w}" height="{height}" fill="white"/>']
    panels = [("Requests per second (more is better)", "rps", 0, "#4878a8"),
              ("CPU µs per request of the measured process (less is better)", "cpu_us_per_request", 1, "#c8643c")]
    for index, (title, key, digits, colour) in enumerate(panels):
        top = index * panel_h + 20
        parts.append(f'<text x="10" y="{top}" font-weight="bold">{html.escape(title)}</text>')
        values = [r.get(key) or 0 for _, r in rows]
        peak = max(values) or 1
        for i, (name, value) in enumerate(zip(names, values)):
            y = top + 15 + i * (bar_h + gap)
            w = max(1, value / peak * width)
            parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{name}</text>')
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>')
            parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{value:,.{digits}f}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
