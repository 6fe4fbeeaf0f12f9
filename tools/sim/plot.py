#!/usr/bin/env python3
"""Charts for sched-sim results.

Usage: plot.py RESULTS.json OUT_PREFIX
Reads the file written by `sched-sim --json` and writes OUT_PREFIX.png and
OUT_PREFIX.svg: time to first token p99 by priority and policy (top), and the
cumulative distributions of time to first token and of end-to-end latency per
priority, one line per policy (below). Prints the two paths.
"""
import json
import math
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

PRIORITIES = ["Critical", "High", "Normal", "Low"]
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def seconds(ms):
    return None if ms is None else ms / 1000.0


def label(policy):
    return policy["label"] + (" (did not finish)" if policy.get("failure") else "")


def by_priority(policy):
    return {p["priority"]: p for p in policy["priorities"]}


def seconds_text(v):
    # Two significant digits at least: 0.007 s must not read 0.01.
    if v < 0.1:
        return f"{v:.3f}"
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


def bar_chart(ax, policies):
    width = 0.8 / max(1, len(policies))
    missing = []  # (bar, label) of the priorities with no completed request or a p99 of 0
    for k, policy in enumerate(policies):
        rows = by_priority(policy)
        values = [seconds(rows[p]["ttft_ms"]["p99"]) if p in rows else None for p in PRIORITIES]
        xs = [i + (k - (len(policies) - 1) / 2) * width for i in range(len(PRIORITIES))]
        heights = [v if v is not None else 0 for v in values]
        bars = ax.bar(xs, heights, width, label=label(policy), color=COLORS[k % len(COLORS)])
        for bar, v in zip(bars, values):
            if v is None or v <= 0:  # no bar to stand on in a log scale
                missing.append((bar, "none done" if v is None else "0"))
                continue
            ax.annotate(seconds_text(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    # Headroom above the tallest bar for the legend.
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * 30)
    # A bar of no height has nothing to stand on in a log scale: its label
    # goes on the axis floor, which is known only now.
    for bar, text in missing:
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bottom), ha="center", va="bottom",
                    fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(PRIORITIES)), PRIORITIES)
    ax.set_ylabel("time to first token p99 (s, log)")
    ax.set_title("Time to first token, 99th percentile, by priority")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)


def cdf_panel(ax, policies, priority, key, xlabel):
    levels = None
    for k, policy in enumerate(policies):
        row = by_priority(policy).get(priority)
        if row is None or row["completed"] == 0:
            continue
        values = [seconds(v) for v in row[key]]
        levels = [i / (len(values) - 1) for i in range(len(values))]
        ax.step([max(v, 1e-3) for v in values], levels, where="post", label=policy["name"],
                color=COLORS[k % len(COLORS)])
    ax.set_xscale("log")
    ax.set_ylim(0, 1.01)
    ax.set_title(f"{priority}", fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(which="both", alpha=0.3)
    ax.tick_params(labelsize=7)
    if levels is None:
        ax.text(0.5, 0.5, "no completed requests", ha="center", va="center", transform=ax.transAxes)
    return levels is not None


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        data = json.load(f)
    policies = data["policies"]
    trace = data["trace"]

    fig = plt.figure(figsize=(13, 11), layout="constrained")
    grid = fig.add_gridspec(3, 4, height_ratios=[1.3, 1, 1])
    bar_chart(fig.add_subplot(grid[0, :]), policies)
    for row, (key, label) in enumerate([("ttft_cdf_ms", "time to first token (s)"),
                                        ("e2e_cdf_ms", "end-to-end latency (s)")], start=1):
        legend_drawn = row != 1  # one legend, on the first panel of the top row with lines
        for col, priority in enumerate(PRIORITIES):
            ax = fig.add_subplot(grid[row, col])
            has_lines = cdf_panel(ax, policies, priority, key, label)
            if col == 0:
                ax.set_ylabel("share of completed requests", fontsize=8)
            if has_lines and not legend_drawn:
                ax.legend(fontsize=7, loc="lower right")
                legend_drawn = True
    load = trace["offered_rps"] / trace["capacity_rps"] if trace["capacity_rps"] else math.nan
    fig.suptitle(f"sched-sim: {trace['requests']} requests from {trace['path'].split('/')[-1]}, "
                 f"offered {trace['offered_rps']:.1f} req/s (about {load:.2f}x estimated capacity)")

    prefix = argv[2]
    paths = [prefix + ".png", prefix + ".svg"]
    fig.savefig(paths[0], dpi=110, metadata={"Software": None})
    # Fixed ids and no date: the same results give the same SVG. The salt fixes
    # most ids, but matplotlib (3.6) also hashes the id() of each clip path
    # into its id, so those are renumbered in order of first appearance.
    plt.rcParams["svg.hashsalt"] = "sched-sim"
    fig.savefig(paths[1], metadata={"Date": None, "Creator": None})
    with open(paths[1], encoding="utf-8") as f:
        svg = f.read()
    clip_ids = {}
    for m in re.finditer(r'<clipPath id="(p[0-9a-f]+)"', svg):
        clip_ids.setdefault(m.group(1), f"clip{len(clip_ids)}")
    if clip_ids:
        svg = re.sub(r'(?<=["#])(p[0-9a-f]+)(?=[")])', lambda m: clip_ids.get(m.group(1), m.group(1)), svg)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(svg)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
