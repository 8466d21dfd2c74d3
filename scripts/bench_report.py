#!/usr/bin/env python3
"""Turns the suite's results.jsonl (one freshd-load report per line) into the
markdown table freshd | peer | ratio, and, with --plots DIR, PNG plots:
notice_cdf_<subs>_at_<rate>.png (write-to-notice latency CDFs),
check_cdf.png (open-loop check latency CDFs) and throughput.png (bars).

Needs matplotlib only for --plots."""

import argparse
import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def round_of(r):
    """The round a report belongs to: its label's `@N` suffix, else 1."""
    label = r.get("label") or ""
    return int(label.rsplit("@", 1)[1]) if "@" in label else 1


def find(reports, **want):
    """The first report matching `want` (round 1 when there are rounds)."""
    for r in reports:
        if all(_get(r, k) == v for k, v in want.items()):
            return r
    return None


def median_round(reports, fwant, pwant, metric):
    """freshd and its peer in the round whose freshd/peer ratio of `metric`
    is the median, with every round's ratio (sorted); None when no round has
    both."""
    def by_round(want):
        out = {}
        for r in reports:
            if all(_get(r, k) == v for k, v in want.items()):
                out.setdefault(round_of(r), r)
        return out
    fs, ps = by_round(fwant), by_round(pwant)
    pairs = sorted((ratio(metric(fs[k]), metric(ps[k])) or 0.0, k) for k in set(fs) & set(ps))
    if not pairs:
        return None
    _, k = pairs[(len(pairs) - 1) // 2]
    return fs[k], ps[k], [x for x, _ in pairs]


# The loopback floor (`freshd-load floor-server`): a server that only copies
# each change to every subscriber's socket, the least any server can do.
FLOOR = "loopback floor (N writes)"
# Its variants: a connection per subscriber, and subscribers that share
# connections (each change written to a connection once per subscriber
# there, in one write).
FLOOR_EACH = "line -> N writes"
FLOOR_SHARED = "line -> N writes, shared conns"
SHARED_FLOOR = "loopback floor, shared conns (a write per connection)"


# freshd's notice variants: a connection per subscriber, and subscribers
# that share connections (`--per-conn`).
WATCH = "Publish -> Watch"
SHARED = "Publish -> Watch, shared conns"


def shared_pair(reports, subs, rate):
    """freshd's subscribers sharing connections and freshd's own with a
    connection each, in the round whose p99 ratio is the median."""
    return median_round(reports, dict(workload="notice", target="freshd", subscribers=subs,
                                      rate=rate, variant=SHARED),
                        dict(workload="notice", target="freshd", subscribers=subs, rate=rate,
                             variant=WATCH),
                        lambda r: r["latency"]["p99_us"])


def shared_floor_pair(reports, subs, rate):
    """freshd's subscribers sharing connections and the floor's, in the
    round whose p99 ratio is the median."""
    return median_round(reports, dict(workload="notice", target="freshd", subscribers=subs,
                                      rate=rate, variant=SHARED),
                        dict(workload="notice", target="floor", subscribers=subs, rate=rate,
                             variant=FLOOR_SHARED),
                        lambda r: r["latency"]["p99_us"])


def notice_pair(reports, subs, rate, peer):
    """freshd and `peer` in the round whose p99 ratio is the median, with
    every round's ratio; etcd runs in the first round only. A connection
    per subscriber on both sides."""
    pwant = dict(workload="notice", target=peer, subscribers=subs, rate=rate)
    if peer == "floor":
        pwant["variant"] = FLOOR_EACH
    return median_round(reports, dict(workload="notice", target="freshd", subscribers=subs,
                                      rate=rate, variant=WATCH),
                        pwant, lambda r: r["latency"]["p99_us"])


def per_conn(r):
    return r["params"].get("per_conn") or 1


def _get(r, key):
    if key in ("subscribers", "rate", "batch"):
        return r["params"].get(key)
    return r.get(key)


def fmt(x, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float) and x < 100:
        return f"{x:,.1f}{unit}"
    return f"{x:,.0f}{unit}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def rows(reports):
    """(what, freshd, peer name, peer, ratio, goal, met) rows."""
    out = []

    def add(what, f, peer_name, p, goal=None, higher_better=True, unit="", spread=None,
            runs=()):
        r = ratio(f, p)
        if any(load_bound(x) for x in runs):
            what += " (load tool saturated)"
        met = ""
        if goal is not None and r is not None:
            ok = r >= goal if higher_better else r <= goal
            met = "yes" if ok else "**no**"
        goal_text = "" if goal is None else (f">= {goal}x" if higher_better else f"<= {goal}x")
        shown = "n/a" if r is None else f"{r:.2f}"
        if r is not None and spread and len(spread) > 1:
            shown += f" ({spread[0]:.2f}-{spread[-1]:.2f}, median of {len(spread)} rounds)"
        out.append((what, fmt(f, unit), peer_name, fmt(p, unit), shown, goal_text, met))

    ops = lambda r: r["ops_per_sec"]
    keys = lambda r: r["keys_per_sec"]

    # Checks.
    m = median_round(reports, dict(workload="check", target="freshd", mode="closed", batch=1,
                                   variant="Check"),
                     dict(workload="check", target="redis", mode="closed", batch=1), ops)
    f, p, spread = m if m else (None, None, None)
    if f and p:
        add("single-key check, ops/s (16 conns, closed loop)", f["ops_per_sec"], "Redis GET",
            p["ops_per_sec"], 0.5, spread=spread, runs=(f, p))
        add("  p50 at that load, µs", f["latency"]["p50_us"], "Redis GET", p["latency"]["p50_us"],
            higher_better=False)
        add("  p99 at that load, µs", f["latency"]["p99_us"], "Redis GET", p["latency"]["p99_us"],
            higher_better=False)
    # The same 16 requests in flight as HTTP/2 streams over fewer connections,
    # as a gRPC client sharing a channel sends them.
    streamed = next((r for r in reports if r["workload"] == "check" and r["target"] == "freshd"
                     and r["mode"] == "closed" and r["params"]["batch"] == 1
                     and r["params"].get("streams", 1) > 1), None)
    if streamed:
        m = median_round(reports, dict(workload="check", target="freshd", mode="closed",
                                       batch=1, variant=streamed["variant"]),
                         dict(workload="check", target="redis", mode="closed", batch=1), ops)
        if m:
            f, p, spread = m
            conns, streams = f["params"]["conns"], f["params"]["streams"]
            add(f"single-key check, ops/s ({conns} conns x {streams} streams, closed loop)",
                f["ops_per_sec"], "Redis GET (16 conns)", p["ops_per_sec"], spread=spread,
                runs=(f, p))
    p99 = lambda r: r["latency"]["p99_us"]
    rates = sorted({r["params"]["rate"] for r in reports if r["workload"] == "check"
                    and r["target"] == "freshd" and r["mode"] == "open" and r["params"]["batch"] == 1})
    for rate in rates:
        m = median_round(reports, dict(workload="check", target="freshd", mode="open", batch=1,
                                       rate=rate),
                         dict(workload="check", target="redis", mode="open", batch=1, rate=rate), p99)
        if m:
            f, p, spread = m
            add(f"single-key check at {rate:,.0f}/s (open loop), p50 µs", f["latency"]["p50_us"],
                "Redis GET", p["latency"]["p50_us"], higher_better=False, runs=(f, p))
            add(f"single-key check at {rate:,.0f}/s (open loop), p99 µs", f["latency"]["p99_us"],
                "Redis GET", p["latency"]["p99_us"], higher_better=False, spread=spread,
                runs=(f, p))
    for batch in (64, 1000):
        for variant, goal in ((f"MGET {batch}", 1.0), (f"pipelined GET {batch}", None)):
            m = median_round(reports, dict(workload="check", target="freshd", mode="closed",
                                           batch=batch, variant=f"CheckBatch {batch}"),
                             dict(workload="check", target="redis", mode="closed", batch=batch,
                                  variant=variant), keys)
            if m:
                f, p, spread = m
                add(f"CheckBatch {batch}, keys/s", f["keys_per_sec"], "Redis " + variant,
                    p["keys_per_sec"], goal, spread=spread, runs=(f, p))
    # Notices.
    cases = sorted({(r["params"]["subscribers"], r["params"]["rate"]) for r in reports
                    if r["workload"] == "notice"})
    for subs, rate in cases:
        for peer, name in (("redis", "Redis SET -> tracking"), ("etcd", "etcd Put -> Watch"),
                           ("floor", FLOOR)):
            m = notice_pair(reports, subs, rate, peer)
            if not m:
                continue
            f, p, spread = m
            for q in ("p50", "p99"):
                goal = 1.0 if (q == "p99" and peer == "redis") else None
                noun = "subscriber" if subs == 1 else "subscribers"
                add(f"write-to-notice, {subs:,} {noun} at {rate:g}/s, {q} µs",
                    f["latency"][f"{q}_us"], name, p["latency"][f"{q}_us"], goal,
                    higher_better=False, spread=spread if q == "p99" else None, runs=(f, p))
        # freshd's subscribers sharing connections, against freshd's own
        # with a connection each, in the same round.
        m = shared_pair(reports, subs, rate)
        if m:
            f, p, spread = m
            conns = -(-subs // f["params"]["per_conn"])
            for q in ("p50", "p99"):
                add(f"write-to-notice, {subs:,} subscribers on {conns:,} connections at "
                    f"{rate:g}/s, {q} µs", f["latency"][f"{q}_us"],
                    "freshd, a connection each", p["latency"][f"{q}_us"], higher_better=False,
                    spread=spread if q == "p99" else None, runs=(f, p))
        # And against the floor on as many connections.
        m = shared_floor_pair(reports, subs, rate)
        if m:
            f, p, spread = m
            conns = -(-subs // per_conn(f))
            for q in ("p50", "p99"):
                add(f"write-to-notice, {subs:,} subscribers on {conns:,} connections at "
                    f"{rate:g}/s, {q} µs", f["latency"][f"{q}_us"], SHARED_FLOOR,
                    p["latency"][f"{q}_us"], higher_better=False,
                    spread=spread if q == "p99" else None, runs=(f, p))
    m = median_round(reports, dict(workload="fanout", target="freshd"),
                     dict(workload="fanout", target="redis"), keys)
    if m:
        f, p, spread = m
        add(f"notices/s to {f['params']['subscribers']:,} subscribers", f["keys_per_sec"],
            "Redis PUBLISH", p["keys_per_sec"], 1.0, spread=spread, runs=(f, p))
    f = find(reports, workload="deps", target="freshd")
    p = find(reports, workload="deps", target="redis")
    if f and p:
        d = f["params"]["dependents"]
        add(f"{d:,} dependents, time to last notice, median ms", f["latency"]["p50_us"] / 1000,
            "Redis EVAL + tracking", p["latency"]["p50_us"] / 1000, 1.0, higher_better=False)
        add(f"{d:,} dependents, time to last notice, max ms", f["latency"]["max_us"] / 1000,
            "Redis EVAL + tracking", p["latency"]["max_us"] / 1000, higher_better=False)
    f = find(reports, workload="memory", target="freshd")
    p = find(reports, workload="memory", target="redis")
    if f and p:
        k = f["params"]["keys"]
        add(f"bytes per key ({k:,} keys, 4 deps each; freshd RSS)", f["extra"]["bytes_per_key"],
            "Redis used_memory", p["extra"]["bytes_per_key"], 1.0, higher_better=False)
        add("  against Redis RSS", f["extra"]["bytes_per_key"], "Redis used_memory_rss",
            p["extra"]["rss_per_key"], higher_better=False)
    return out


def table(reports):
    lines = ["| workload | freshd | peer | peer's figure | ratio freshd/peer | goal | met |",
             "|---|---:|---|---:|---:|---|---|"]
    for what, f, peer, p, r, goal, met in rows(reports):
        lines.append(f"| {what} | {f} | {peer} | {p} | {r} | {goal} | {met} |")
    return "\n".join(lines)


def window(r):
    """The window a report's CPU times were read over, seconds."""
    return (r.get("extra") or {}).get("cpu_window_s") or r["secs"]


def busy(r):
    """Server cores busy over the window its CPU time was read in."""
    return r["server_cpu_s"] / window(r)


def load_busy(r):
    """The load tool's cores busy in the same window; None when not read."""
    cpu = r.get("load_cpu_s")
    return None if cpu is None else cpu / window(r)


# The load tool runs on one core: at this share of it or more, a run's
# figures measure the load generator as much as the server.
LOAD_BOUND = 0.85


def load_bound(r):
    b = load_busy(r)
    return b is not None and b >= LOAD_BOUND


def fmt_busy(r):
    b = load_busy(r)
    return "n/a" if b is None else f"{b:.2f}"


def cpu_table(reports):
    """Server CPU per operation, freshd against each peer in the same case."""
    lines = ["| workload | per | freshd µs | peer | peer µs | ratio | freshd cores busy | peer cores busy | load tool cores busy (freshd / peer run) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    per = {"check": "request", "notice": "notice received", "fanout": "notice received"}
    for f in reports:
        if f["target"] != "freshd" or f.get("server_cpu_s") is None or not f["ops"]:
            continue
        for p in reports:
            if (p["target"] == "freshd" or p["workload"] != f["workload"] or p["mode"] != f["mode"]
                    or p.get("server_cpu_s") is None or not p["ops"]):
                continue
            keys = ("batch", "rate", "subscribers")
            if (any(f["params"].get(k) != p["params"].get(k) for k in keys)
                    or round_of(f) != round_of(p)):
                continue
            # The floor beside freshd on as many connections.
            if p["target"] == "floor" and per_conn(p) != per_conn(f):
                continue
            fu = f["server_cpu_s"] * 1e6 / f["ops"]
            pu = p["server_cpu_s"] * 1e6 / p["ops"]
            what = f"{f['workload']} {f['variant']} ({f['mode']}"
            what += f", {f['params']['rate']:g}/s" if f["params"].get("rate") else ""
            what += f", {f['params']['subscribers']:,} subs" if f["params"].get("subscribers") else ""
            what += f", round {round_of(f)}" if round_of(f) > 1 else ""
            what += ")"
            # A peer idle enough to read no CPU time at all has no ratio.
            ratio = f"{fu / pu:.2f}" if pu > 0 else "n/a"
            lines.append(f"| {what} | {per.get(f['workload'], 'op')} | {fu:,.2f} | "
                         f"{p['target']} {p['variant']} | {pu:,.2f} | {ratio} | "
                         f"{busy(f):.2f} | {busy(p):.2f} | {fmt_busy(f)} / {fmt_busy(p)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def errors(reports):
    bad = [r for r in reports if r["errors"]]
    if not bad:
        return "Every run finished without errors (every answer checked, every notice received)."
    return "Runs with errors:\n" + "\n".join(
        f"- {r['workload']} {r['target']} {r['variant']}: {r['errors']} ({json.dumps(r['extra'])})"
        for r in bad)


COLORS = {"freshd": "#1f77b4", "redis": "#d62728", "etcd": "#2ca02c", "floor": "#7f7f7f"}


def cdf_axes(ax, series, title):
    """One CDF per `(label, report)` of `series`, or `(label, report, style)`
    where `style` overrides the target's colour and the rate's line."""
    styles = ["-", "--", ":", "-."]
    rates = sorted({entry[1]["params"].get("rate") for entry in series})
    for label, report, *override in series:
        style = styles[rates.index(report["params"].get("rate")) % len(styles)] if len(rates) > 1 else "-"
        cdf = report["latency"]["cdf"]
        xs = [max(v, 1) / 1000 for _, v in cdf]
        ys = [q for q, _ in cdf]
        kwargs = dict(color=COLORS.get(report["target"]), linestyle=style)
        kwargs.update(*override)
        ax.plot(xs, ys, label=f"{label} (p99 {report['latency']['p99_us'] / 1000:.2f} ms)",
                drawstyle="steps-post", **kwargs)
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log)")
    ax.set_ylabel("fraction of notices" if "notice" in title else "fraction of requests")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")


def plots(reports, out):
    import os
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    written = []
    names = {"freshd": "freshd Publish -> Watch", "redis": "Redis SET -> tracking",
             "etcd": "etcd Put -> Watch", "floor": FLOOR}
    cases = sorted({(r["params"]["subscribers"], r["params"]["rate"]) for r in reports
                    if r["workload"] == "notice"})
    for subs, rate in cases:
        # freshd and Redis from the median round of the table, etcd from
        # the first (it runs there only).
        m = notice_pair(reports, subs, rate, "redis")
        picked = {"freshd": m[0], "redis": m[1]} if m else {}
        etcd = find(reports, workload="notice", target="etcd", subscribers=subs, rate=rate)
        if etcd:
            picked["etcd"] = etcd
        floor = notice_pair(reports, subs, rate, "floor")
        if floor:
            picked["floor"] = floor[1]
        if "freshd" not in picked:
            picked["freshd"] = find(reports, workload="notice", target="freshd",
                                    subscribers=subs, rate=rate, variant=WATCH)
        series = [(names[t], picked[t]) for t in ("freshd", "redis", "etcd", "floor")
                  if picked.get(t)]
        shared = shared_pair(reports, subs, rate)
        if shared:
            series.insert(1, (f"freshd, {per_conn(shared[0])} subscribers a connection",
                              shared[0], dict(color=COLORS["freshd"], linestyle="--")))
        shared_floor = shared_floor_pair(reports, subs, rate)
        if shared_floor:
            series.append((f"floor, {per_conn(shared_floor[1])} subscribers a connection",
                           shared_floor[1], dict(color=COLORS["floor"], linestyle="--")))
        fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
        cdf_axes(ax, series, f"write-to-notice latency, {subs:,} subscribers, {rate:g} writes/s")
        path = os.path.join(out, f"notice_cdf_{subs}_at_{rate:g}.png")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    opens = [r for r in reports if r["workload"] == "check" and r["mode"] == "open"
             and r["params"]["batch"] == 1 and round_of(r) == 1]
    if opens:
        fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
        series = [(f"{'freshd Check' if r['target'] == 'freshd' else 'Redis GET'} at "
                   f"{r['params']['rate']:,.0f}/s", r) for r in opens]
        cdf_axes(ax, series, "single-key check latency, open loop, 16 connections")
        path = os.path.join(out, "check_cdf.png")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    panels = []
    def bars(title, items):
        items = [(n, v, t) for n, v, t in items if v is not None]
        if items:
            panels.append((title, items))

    def val(r, key):
        return None if r is None else r[key]

    def median_pair(fwant, pwant, key):
        """The pair of the table's median round, or nones."""
        m = median_round(reports, fwant, pwant, lambda r: r[key])
        return (val(m[0], key), val(m[1], key)) if m else (None, None)

    f, p = median_pair(dict(workload="check", target="freshd", mode="closed", batch=1,
                            variant="Check"),
                       dict(workload="check", target="redis", mode="closed", batch=1),
                       "ops_per_sec")
    bars("single-key check, ops/s", [("freshd Check", f, "freshd"), ("Redis GET", p, "redis")])
    for batch in (64, 1000):
        fwant = dict(workload="check", target="freshd", mode="closed", batch=batch,
                     variant=f"CheckBatch {batch}")
        f, mget = median_pair(fwant, dict(workload="check", target="redis", mode="closed",
                                          batch=batch, variant=f"MGET {batch}"), "keys_per_sec")
        _, piped = median_pair(fwant, dict(workload="check", target="redis", mode="closed",
                                           batch=batch, variant=f"pipelined GET {batch}"),
                               "keys_per_sec")
        bars(f"batches of {batch}, keys/s", [
            ("freshd CheckBatch", f, "freshd"),
            ("Redis MGET", mget, "redis"),
            ("Redis pipelined GET", piped, "redis")])
    f, p = median_pair(dict(workload="fanout", target="freshd"),
                       dict(workload="fanout", target="redis"), "keys_per_sec")
    bars("notices/s to 1,000 subscribers", [("freshd Watch", f, "freshd"),
                                            ("Redis pub/sub", p, "redis")])
    fd = find(reports, workload="deps", target="freshd")
    rd = find(reports, workload="deps", target="redis")
    bars("10k dependents: ms to last notice (lower is better)", [
        ("freshd", fd and fd["latency"]["p50_us"] / 1000, "freshd"),
        ("Redis EVAL+tracking", rd and rd["latency"]["p50_us"] / 1000, "redis")])
    fm = find(reports, workload="memory", target="freshd")
    rm = find(reports, workload="memory", target="redis")
    bars("bytes per key with 4 deps (lower is better)", [
        ("freshd RSS", fm and fm["extra"]["bytes_per_key"], "freshd"),
        ("Redis used_memory", rm and rm["extra"]["bytes_per_key"], "redis"),
        ("Redis RSS", rm and rm["extra"]["rss_per_key"], "redis")])
    if panels:
        cols = 3
        rows_n = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(11, 3.3 * rows_n), dpi=80, squeeze=False)
        for ax, (title, items) in zip(axes.flat, panels):
            names_ = [n for n, _, _ in items]
            values = [v for _, v, _ in items]
            colors = [COLORS[t] for _, _, t in items]
            shades = [c if i < 2 else "#f4a0a0" for i, c in enumerate(colors)]
            ax.bar(range(len(values)), values, color=shades)
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels(names_, fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:,.0f}" if v >= 100 else f"{v:.1f}", ha="center", va="bottom",
                        fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(out, "throughput.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("results")
    ap.add_argument("--machine")
    ap.add_argument("--plots")
    args = ap.parse_args()
    reports = load(args.results)
    if args.machine:
        print("```\n" + open(args.machine).read().rstrip() + "\n```\n")
    print(table(reports))
    print()
    if any(load_bound(r) for r in reports):
        print(f"(load tool saturated): in that row's freshd or peer run the load tool, pinned to "
              f"one core, used {LOAD_BOUND:.0%} of it or more, so the figures there measure the "
              "load generator's client as much as the server.\n")
    cpu = cpu_table(reports)
    if cpu:
        print("Server CPU per operation (from /proc, over the measured window):\n")
        print(cpu)
        print()
    print(errors(reports))
    if args.plots:
        for p in plots(reports, args.plots):
            print(f"\nwrote {p}", file=sys.stderr)


if __name__ == "__main__":
    main()
