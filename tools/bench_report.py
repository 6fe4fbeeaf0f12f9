#!/usr/bin/env python3
"""Runs the benchmark suite (bench/, binary tgi_bench) and writes, under one
output folder: raw.json (Google Benchmark's JSON, every repetition),
console.txt, report.md (tables: throughput, ratios, fairness, latency,
memory, goals) and throughput.svg / latency.svg.

  python3 tools/bench_report.py                       short run (~3-5 min on 2 cores) -> out/bench/
  python3 tools/bench_report.py --full                long run -> bench/results/<commit>-<machine>-<date>/
  python3 tools/bench_report.py --full --threads 1,2,4,8,16,32 --build-dir build-bench
  python3 tools/bench_report.py --report-only out/bench/raw.json   re-render from a raw file

--out bench/results names a fresh <commit>-<machine>-<date> folder inside it;
any other --out is used as given. Methodology: bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT = {"repetitions": 3, "duration_ms": 100}
FULL = {"repetitions": 5, "duration_ms": 300}

QUEUE_BASELINES = ("seed_mutex", "atomic_queue1")
POOL_BASELINE = "mutex_vector"
ALLOC_PEERS = ("mutex_vector", "mutex_deque", "tbb_queue", "atomic_bitmap")
PROJECT = "tgi_gtc"
MUTEX_QUEUES = ("seed_mutex", "mutex_deques")
LOCKFREE_PRIORITY_PEERS = ("boost_lockfree4", "moodycamel4", "atomic_queue4")
# A figure whose repetitions lie further apart than this (largest over
# smallest) has no typical value: its median is one of the modes it ran in.
WIDE_SPREAD = 1.5

WORKLOAD_TEXT = {
    "pair.d0": "schedule then next per thread, queue held empty (capacity 16,384, as every pair workload)",
    "pair.d0.c1024": "schedule then next per thread, queue held empty, capacity 1,024 (the default-sized queue)",
    "pair.d1000": "schedule then next per thread, queue held at 1,000 tasks",
    "pair.d10000": "schedule then next per thread, queue held at 10,000 tasks",
    "peek.d1000": "schedule, peek, next per thread at depth 1,000 (peers with peek)",
    "prodcons": "half the threads schedule, half take; capacity 1,024; item = task taken",
    "burst": "thread 0 schedules 10,000, then all threads drain; item = task taken",
    "cancel.d1000": ("schedule 3, cancel 1 by id, next until 3 are out (2, or 3 when the cancel missed), at depth "
                     "1,000 (peers with cancel); item = task removed"),
    "nearfull": "queue kept at capacity 1,024: schedule, on refusal next; item = task taken",
    "alloc.k1": "allocate 1 block then release it",
    "alloc.k4": "allocate 4 blocks then release them",
    "alloc.k16": "allocate 16 blocks then release them",
    "alloc.k64": "allocate 64 blocks then release them",
    "alloc.rand": "allocate k blocks (k uniform in 1..64) then release them",
}
QUEUE_ORDER = ["pair.d0", "pair.d0.c1024", "pair.d1000", "pair.d10000", "peek.d1000", "prodcons", "burst",
               "cancel.d1000", "nearfull"]
POOL_ORDER = ["alloc.k1", "alloc.k4", "alloc.k16", "alloc.k64", "alloc.rand"]
EXTRA_COUNTERS = {
    "prodcons": ("full_per_item", "empty_per_item"),
    "burst": ("fill_ns_per_task",),
    "cancel.d1000": ("cancel_hit", "refused"),
    "nearfull": ("refused_per_item",),
    "alloc.rand": ("blocks_per_s",),
}


# ---------------------------------------------------------------------------
# Running


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug() -> str:
    model = re.sub(r"\(R\)|\(TM\)|CPU|Processor|[0-9]+-Core", "", cpu_model())
    model = re.sub(r"@.*", "", model)
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "cpu"
    return f"{slug}-{os.cpu_count()}t"


def run_name() -> str:
    commit = git("rev-parse", "--short=10", "HEAD") or "nogit"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return f"{commit}-{machine_slug()}-{dt.date.today().isoformat()}"


def resolve_out(args) -> Path:
    results = (ROOT / "bench" / "results").resolve()
    if args.out is None:
        out = results / run_name() if args.full else ROOT / "out" / "bench"
    else:
        out = Path(args.out)
        if not out.is_absolute():
            out = Path.cwd() / out
        if out.resolve() == results:
            out = results / run_name()
    if args.out is None and not args.full:
        return out
    if out.parent.resolve() == results and out.exists() and any(out.iterdir()):
        out = out.with_name(out.name + dt.datetime.now().strftime("-%H%M%S"))
    return out


def run_suite(args, out: Path) -> Path:
    build = Path(args.build_dir)
    if not build.is_absolute():
        build = Path.cwd() / build
    binary = Path(args.binary) if args.binary else build / "bench" / "tgi_bench"
    if not binary.exists():
        sys.exit(f"bench_report: {binary} not found; build it first:\n"
                 f"  cmake -S {ROOT} -B {build} -DCMAKE_BUILD_TYPE=Release -DTGI_GTC_BUILD_TESTS=OFF "
                 f"-DTGI_GTC_BUILD_TOOLS=OFF && cmake --build {build} --target tgi_bench")
    preset = FULL if args.full else SHORT
    reps = args.repetitions or preset["repetitions"]
    duration = args.duration_ms or preset["duration_ms"]
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw.json"
    cmd = [str(binary), f"--benchmark_out={raw}", "--benchmark_out_format=json",
           f"--benchmark_repetitions={reps}", "--benchmark_display_aggregates_only=true",
           # Repetitions of all figures in random order, not each figure's back
           # to back: a slow spell of a shared machine then spreads over every
           # peer instead of sinking one, and the per-figure medians (ratios
           # between peers) hold up.
           "--benchmark_enable_random_interleaving=true",
           f"--duration_ms={duration}"]
    if args.threads:
        cmd.append(f"--threads={args.threads}")
    if args.filter:
        cmd.append(f"--benchmark_filter={args.filter}")
    if args.no_latency:
        cmd.append("--no_latency")
    print("bench_report: running", " ".join(shlex.quote(c) for c in cmd), flush=True)
    started = dt.datetime.now()
    load_before = list(os.getloadavg())
    with open(out / "console.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if not args.quiet:
                sys.stdout.write(line)
        rc = proc.wait()
    if rc != 0:
        sys.exit(f"bench_report: the benchmark binary exited with {rc}; see {out / 'console.txt'}")
    # Keep every repetition, drop the library's aggregates (the report computes
    # its own medians from the repetitions) and the indentation: a third of the size.
    data = json.loads(raw.read_text())
    data["benchmarks"] = [b for b in data.get("benchmarks", []) if b.get("run_type") != "aggregate"]
    raw.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    meta = {
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "binary_command": cmd,
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "started": started.isoformat(timespec="seconds"),
        "wall_s": (dt.datetime.now() - started).total_seconds(),
        "repetitions": reps,
        "duration_ms": duration,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return raw


# ---------------------------------------------------------------------------
# Reading


class Results:
    """Repetitions grouped by (workload, peer, flavour, threads)."""

    def __init__(self, raw: dict):
        self.context = raw.get("context", {})
        self.runs: dict[tuple, list[dict]] = defaultdict(list)
        self.errors: dict[tuple, str] = {}
        self.single: dict[tuple, dict] = {}
        for b in raw.get("benchmarks", []):
            if b.get("run_type") == "aggregate":
                continue
            parts = b.get("run_name", b["name"]).split("/")
            threads = int(b.get("threads", 1))
            if b.get("error_occurred"):
                key = (parts[0], parts[1], parts[2] if len(parts) > 2 and parts[2] in ("tput", "lat") else "", threads)
                self.errors[key] = b.get("error_message", "error")
                continue
            if parts[0].startswith("memory"):
                self.single[(parts[0], parts[1])] = b
                continue
            if len(parts) < 3 or parts[2] not in ("tput", "lat"):
                continue
            self.runs[(parts[0], parts[1], parts[2], threads)].append(b)

    def threads(self) -> list[int]:
        return sorted({k[3] for k in self.runs if k[0] != "engine"})

    def peers(self, workload: str) -> list[str]:
        seen = []
        for k in self.runs:
            if k[0] == workload and k[1] not in seen:
                seen.append(k[1])
        for k in self.errors:
            if k[0] == workload and k[1] not in seen:
                seen.append(k[1])
        return seen

    def failed(self, workload, peer, threads) -> bool:
        """A repetition of either flavour failed a check: the figure reports nothing."""
        return any((workload, peer, f, threads) in self.errors for f in ("tput", "lat", ""))

    def values(self, workload, peer, flavour, threads, counter) -> list[float]:
        if self.failed(workload, peer, threads):
            return []
        return [r[counter] for r in self.runs.get((workload, peer, flavour, threads), []) if counter in r]

    def median(self, workload, peer, flavour, threads, counter):
        vals = self.values(workload, peer, flavour, threads, counter)
        return statistics.median(vals) if vals else None

    def maximum(self, workload, peer, flavour, threads, counter):
        vals = self.values(workload, peer, flavour, threads, counter)
        return max(vals) if vals else None

    def spread(self, workload, peer, flavour, threads, counter):
        """Largest over smallest repetition (None without two positive values)."""
        vals = self.values(workload, peer, flavour, threads, counter)
        return max(vals) / min(vals) if len(vals) > 1 and min(vals) > 0 else None

    def compare(self, workload, a, b, threads, factor=1.0, cpu=False):
        """Whether peer a's throughput reached factor x peer b's at `threads`:
        (verdict on the medians, settled). Not settled when the repetitions
        disagree: a's best against b's worst gives another answer than a's worst
        against b's best. (Repetitions run in random order, so they pair up by
        nothing; min and max are the conservative test.) None: not measured."""
        if cpu:  # throughput from CPU time per item (one thread on a shared machine)
            va = [1e9 / v for v in self.values(workload, a, "tput", threads, "cpu_ns_per_item") if v > 0]
            vb = [1e9 / v for v in self.values(workload, b, "tput", threads, "cpu_ns_per_item") if v > 0]
        else:
            va = self.values(workload, a, "tput", threads, "items_per_s")
            vb = self.values(workload, b, "tput", threads, "items_per_s")
        if not va or not vb:
            return None, True
        ok = statistics.median(va) >= factor * statistics.median(vb)
        return ok, (min(va) >= factor * max(vb)) == (max(va) >= factor * min(vb))

    def compare_latency(self, workload, a, others, threads, factor=1.0, counter="p999_ns"):
        """Whether peer a's latency `counter` is at most factor x that of every
        peer in `others` (those measured) at `threads`: (verdict on the medians,
        settled), as compare(): not settled when a's worst repetition against
        the others' best gives another answer than a's best against their
        worst. None: not measured."""
        va = self.values(workload, a, "lat", threads, counter)
        vbs = [v for v in (self.values(workload, b, "lat", threads, counter) for b in others) if v]
        if not va or not vbs:
            return None, True
        ok = all(statistics.median(va) <= factor * statistics.median(vb) for vb in vbs)
        worst = all(max(va) <= factor * min(vb) for vb in vbs)
        best = all(min(va) <= factor * max(vb) for vb in vbs)
        return ok, worst == best

    def reps(self, workload, peer, flavour, threads) -> int:
        return len(self.runs.get((workload, peer, flavour, threads), []))

    def peer_info(self, prefix: str) -> dict[str, dict[str, str]]:
        info = {}
        for key, value in self.context.items():
            if key.startswith(prefix):
                info[key[len(prefix):]] = dict(p.split("=", 1) for p in str(value).split("|") if "=" in p)
        return info


# ---------------------------------------------------------------------------
# Formatting


def fmt_rate(v):
    if v is None:
        return "-"
    if v >= 1e9:
        return f"{v / 1e9:.2f} G"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{v:.0f}"


def fmt_ns(v):
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f} ms"
    if v >= 1e3:
        return f"{v / 1e3:.1f} us"
    return f"{v:.0f} ns"


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x"


def fmt_num(v, digits=2):
    if v is None:
        return "-"
    if v != 0 and abs(v) < 10 ** -digits:
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def fmt_spread(v):
    if v is None:
        return "-"
    return f"{v:.2f} wide" if v > WIDE_SPREAD else f"{v:.2f}"


def fmt_load(v):
    return "?" if not v else ", ".join(f"{x:.1f}" for x in v)


def load_warning(meta: dict, hw: int) -> str:
    """A warning when the machine was busy before the run (1-minute load at least half its threads)."""
    before = meta.get("loadavg_before")
    if not before or before[0] < hw / 2:
        return ""
    return ": other work ran on the machine shortly before or during the run"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Report


def workload_table(res: Results, workload: str, baselines: tuple[str, ...]) -> str:
    extras = EXTRA_COUNTERS.get(workload, ())
    header = ["threads", "peer", "items/s", "spread", "fairness", "ns/item", "CPU ns/item"] + \
             [f"x {b}" for b in baselines] + \
             ["p50", "p99", "p99.9", "max", "preempted /1k calls", "lat fairness", "allocs/item"] + list(extras)
    rows = []
    for n in res.threads():
        for peer in res.peers(workload):
            err = res.errors.get((workload, peer, "tput", n)) or res.errors.get((workload, peer, "lat", n)) \
                or res.errors.get((workload, peer, "", n))
            if err:
                rows.append([str(n), peer, f"ERROR: {err}"] + [""] * (len(header) - 3))
                continue
            if not res.reps(workload, peer, "tput", n):
                continue
            ips = res.median(workload, peer, "tput", n, "items_per_s")
            row = [str(n), f"**{peer}**" if peer == PROJECT else peer, fmt_rate(ips),
                   fmt_spread(res.spread(workload, peer, "tput", n, "items_per_s")),
                   fmt_num(res.median(workload, peer, "tput", n, "fairness")),
                   fmt_num(res.median(workload, peer, "tput", n, "ns_per_item"), 1),
                   fmt_num(res.median(workload, peer, "tput", n, "cpu_ns_per_item"), 1)]
            for b in baselines:
                row.append(fmt_ratio(ips, res.median(workload, b, "tput", n, "items_per_s")))
            row += [fmt_ns(res.median(workload, peer, "lat", n, "p50_ns")),
                    fmt_ns(res.median(workload, peer, "lat", n, "p99_ns")),
                    fmt_ns(res.median(workload, peer, "lat", n, "p999_ns")),
                    fmt_ns(res.maximum(workload, peer, "lat", n, "max_ns")),
                    fmt_num(res.median(workload, peer, "lat", n, "preempted_per_kcall")),
                    fmt_num(res.median(workload, peer, "lat", n, "fairness")),
                    fmt_num(res.median(workload, peer, "tput", n, "allocs_per_item"), 3)]
            for e in extras:
                v = res.median(workload, peer, "tput", n, e)
                row.append(fmt_rate(v) if e.endswith("_per_s") else fmt_num(v))
            rows.append(row)
    return table(header, rows)


def goals(res: Results, hw: int) -> list[list[str]]:
    out = []

    def verdict(ok, settled=True):
        if ok is None:
            return "n/a"
        return ("PASS" if ok else "FAIL") + ("" if settled else " (not settled: some repetitions say otherwise)")

    def count_unsettled(unsettled, total):
        return f"; {unsettled} of {total} comparisons not settled by the repetitions" if unsettled else ""

    def below_floor(unmeasurable, v):
        return f"not measurable here (the empty timed section misses it too); {v} as measured" if unmeasurable else v

    def med(w, p, f, n, c):
        return res.median(w, p, f, n, c)

    def tput_ratio(w, a, b, n):
        """a's throughput over b's at n threads (medians); from CPU time per item
        on one thread, as bench/README.md says of the single-thread goals."""
        if n == 1:
            na, nb = med(w, a, "tput", 1, "cpu_ns_per_item"), med(w, b, "tput", 1, "cpu_ns_per_item")
            return nb / na if na and nb else None
        ta, tb = med(w, a, "tput", n, "items_per_s"), med(w, b, "tput", n, "items_per_s")
        return ta / tb if ta and tb else None

    def unless_missing(v, missing):
        """A PASS that had to leave out peers without a figure (a failed check, or
        not measured) says nothing about them: n/a, naming them. A FAIL stands."""
        if missing and v.startswith("PASS"):
            return "n/a (no figure for " + ", ".join(sorted(set(missing))) + ")"
        return v

    def gated(w, n, v, peer=PROJECT):
        """A goal on the project's figure of w at n threads FAILs when a check of that figure failed
        (its figures are dropped, which would otherwise read as "n/a")."""
        return "FAIL (a check failed: the figure reports nothing)" if res.failed(w, peer, n) else v

    threads = res.threads()
    # 1. single-thread empty pair. One thread never waits for another, so its
    # CPU time per item is the cost of the item even on a busy machine; the
    # wall-clock figure is shown beside it.
    def one_thread_ns(w):
        cpu = med(w, PROJECT, "tput", 1, "cpu_ns_per_item")
        wall = med(w, PROJECT, "tput", 1, "ns_per_item")
        return cpu, (f"{fmt_num(cpu, 1)} ns CPU ({fmt_num(wall, 1)} ns wall)" if cpu else "-")

    def below(w, counter, target, flavour="tput", n=1):
        """verdict() arguments for 'median below target': not settled when the repetitions straddle it."""
        vals = res.values(w, PROJECT, flavour, n, counter)
        if not vals:
            return None, True
        return statistics.median(vals) < target, (min(vals) < target) == (max(vals) < target)

    for w, cap in (("pair.d0", "16,384"), ("pair.d0.c1024", "1,024")):
        ns, shown = one_thread_ns(w)
        out.append([f"pair, empty, capacity {cap}, 1 thread: < 60 ns a pair (CPU time per pair)", shown,
                    gated(w, 1, verdict(*below(w, "cpu_ns_per_item", 60)))])
        # One thread: CPU time per pair on both sides, as bench/README.md says.
        a = med(w, PROJECT, "tput", 1, "cpu_ns_per_item")
        b = med(w, "atomic_queue1", "tput", 1, "cpu_ns_per_item")
        # Below its ring's minimum size (4,096) atomic_queue1 gets the shared
        # capacity counter too (bench/README.md), so it is a slower bound there.
        counted = " (atomic_queue1 with the capacity counter here)" if w == "pair.d0.c1024" else ""
        out.append([f"pair, empty, capacity {cap}, 1 thread: >= 1/3 of atomic_queue1's throughput (CPU time){counted}",
                    fmt_ratio(b, a), gated(w, 1, verdict(*res.compare(w, PROJECT, "atomic_queue1", 1, 1 / 3, cpu=True)))])
    # 2. depth 10,000 vs seed
    figs, ok, unsettled, missing = [], None, 0, []
    for n in threads:
        if res.failed("pair.d10000", PROJECT, n):
            figs.append(f"{n}t ERROR")
            ok = False
            continue
        r = tput_ratio("pair.d10000", PROJECT, "seed_mutex", n)
        if r is None:
            if med("pair.d10000", PROJECT, "tput", n, "items_per_s") is not None:
                missing.append(f"seed_mutex at {n}t")
            continue
        passed, settled = res.compare("pair.d10000", PROJECT, "seed_mutex", n, 10 if n == 1 else 3, cpu=n == 1)
        figs.append(f"{n}t {r:.2f}x" + ("" if settled else " (not settled)"))
        ok = (ok is not False) and passed
        unsettled += not settled
    out.append(["pair, depth 10,000: >= 10x seed_mutex at 1 thread, >= 3x at every count (1 thread: CPU time)",
                ", ".join(figs) or "-", unless_missing(verdict(ok), missing) + count_unsettled(unsettled, len(figs))])
    # 3. pair vs lock-free priority-capable peers
    worst, ok, compared, failed, unsettled, missing = None, None, 0, 0, 0, []
    for w in ("pair.d0", "pair.d0.c1024", "pair.d1000", "pair.d10000"):
        for n in threads:
            if res.failed(w, PROJECT, n):  # every comparison at this count fails
                ok = False
                failed += len(LOCKFREE_PRIORITY_PEERS)
                compared += len(LOCKFREE_PRIORITY_PEERS)
                continue
            if med(w, PROJECT, "tput", n, "items_per_s") is None:
                continue  # not measured at this count
            for p in LOCKFREE_PRIORITY_PEERS:
                r = tput_ratio(w, PROJECT, p, n)
                if r is None:
                    missing.append(p)
                    continue
                if worst is None or r < worst[0]:
                    worst = (r, w, p, n)
                passed, settled = res.compare(w, PROJECT, p, n, cpu=n == 1)
                ok = (ok is not False) and passed
                compared += 1
                failed += not passed
                unsettled += not settled
    out.append(["pair: >= every lock-free priority peer (boost, moodycamel, atomic_queue4), every count "
                "(1 thread: CPU time)",
                "lowest ratio " + (f"{worst[0]:.2f}x vs {worst[2]} ({worst[1]}, {worst[3]}t); "
                                   f"{failed} of {compared} comparisons below 1" if worst else "-"),
                unless_missing(verdict(ok), missing) + count_unsettled(unsettled, compared)])
    # 4. oversubscription: the largest thread count above the hardware threads
    over = [n for n in threads if n > hw]
    n_over = max(over) if over else None
    for w in ("pair.d0", "prodcons", "nearfull"):
        where = f"{w}, {n_over} threads on {hw}" if n_over else f"{w}, oversubscribed"
        if n_over is None:
            out.append([f"{where}: p99.9, fairness, max", "no thread count above the hardware threads", "n/a"])
            continue
        p999 = med(w, PROJECT, "lat", n_over, "p999_ns")
        mut = [m for m in (med(w, m, "lat", n_over, "p999_ns") for m in MUTEX_QUEUES) if m]
        cut = med(w, PROJECT, "lat", n_over, "preempted_per_kcall")
        cut_note = ""
        if cut is not None:
            likely = "; above 1, the p99.9 is likely a preempted call" if cut > 1 else ""
            cut_note = f" (preempted calls: at most {fmt_num(cut)} in 1,000{likely})"
        no_fig = [m for m in MUTEX_QUEUES if med(w, m, "lat", n_over, "p999_ns") is None]
        out.append([f"{where}: p99.9 <= 1/10 of the mutex peers'",
                    f"{fmt_ns(p999)} vs {', '.join(fmt_ns(m) for m in mut) or '-'}{cut_note}",
                    gated(w, n_over, unless_missing(
                        verdict(*res.compare_latency(w, PROJECT, MUTEX_QUEUES, n_over, 0.1)), no_fig))])
        fair = med(w, PROJECT, "tput", n_over, "fairness")
        lat_fair = med(w, PROJECT, "lat", n_over, "fairness")
        # The empty timed section at the same thread count is what the OS
        # alone gives: where it is already past a goal, no queue can be judged.
        floor_fair = med("floor", "none", "lat", n_over, "fairness")
        out.append([f"{where}: fairness >= 0.7",
                    f"{fmt_num(fair)} (timed run {fmt_num(lat_fair)}; empty timed section: {fmt_num(floor_fair)})",
                    gated(w, n_over, below_floor(floor_fair is not None and floor_fair < 0.7,
                                                 verdict(None if fair is None else fair >= 0.7)))])
        mx = res.maximum(w, PROJECT, "lat", n_over, "max_ns")
        mut_mx = [m for m in (res.maximum(w, m, "lat", n_over, "max_ns") for m in MUTEX_QUEUES) if m]
        floor = res.maximum("floor", "none", "lat", n_over, "max_ns")
        out.append([f"{where}: worst operation < 2 ms",
                    f"{fmt_ns(mx)} (mutex peers {', '.join(fmt_ns(m) for m in mut_mx) or '-'}; "
                    f"empty timed section: {fmt_ns(floor)})",
                    gated(w, n_over,
                          below_floor(floor is not None and floor >= 2e6, verdict(None if mx is None else mx < 2e6)))])
    # 5. allocator
    ns, shown = one_thread_ns("alloc.k1")
    out.append(["alloc, 1 block allocate+release, 1 thread: < 15 ns (CPU time per pair)", shown,
                gated("alloc.k1", 1, verdict(*below("alloc.k1", "cpu_ns_per_item", 15)))])
    # At 16 threads (the largest count on a smaller machine): throughput at
    # least 3x the mutex free list, and the best p99.9 of all allocator peers.
    n_alloc = 16 if 16 in threads else max(threads, default=1)
    a = med("alloc.k1", PROJECT, "tput", n_alloc, "items_per_s")
    b = med("alloc.k1", POOL_BASELINE, "tput", n_alloc, "items_per_s")
    out.append([f"alloc k=1, {n_alloc} threads: >= 3x {POOL_BASELINE}'s throughput", fmt_ratio(a, b),
                gated("alloc.k1", n_alloc, verdict(*res.compare("alloc.k1", PROJECT, POOL_BASELINE, n_alloc, 3)))])
    p = med("alloc.k1", PROJECT, "lat", n_alloc, "p999_ns")
    others = {q: med("alloc.k1", q, "lat", n_alloc, "p999_ns") for q in ALLOC_PEERS}
    no_fig = [q for q, v in others.items() if v is None]
    others = {q: v for q, v in others.items() if v is not None}
    out.append([f"alloc k=1, {n_alloc} threads: the best p99.9 of the allocator peers",
                f"{fmt_ns(p)} vs " + (", ".join(f"{q} {fmt_ns(v)}" for q, v in sorted(others.items())) or "-"),
                gated("alloc.k1", n_alloc, unless_missing(
                    verdict(*res.compare_latency("alloc.k1", PROJECT, list(others), n_alloc)), no_fig))])
    # 6. engine
    # Each step is timed alone: a figure within two timer costs of the timer's
    # own (an empty timed section) is at the timer's resolution.
    timer = float(res.context.get("tgi_timer_overhead_ns", 0) or 0)
    for name, target in (("step_no_change", 5e3), ("step_admit32", 20e3)):
        v = med("engine", name, "tput", 1, "median_ns")
        shown = fmt_ns(v) + (f" (at the timer's resolution: an empty timed section reads {timer:.0f} ns)"
                             if v is not None and timer > 0 and v <= 2 * timer else "")
        out.append([f"engine {name}: median < {fmt_ns(target)}", shown,
                    gated("engine", 1, verdict(None if v is None else v < target), peer=name)])
    return out


def memory_tables(res: Results) -> str:
    rows = []
    for (kind, peer), b in res.single.items():
        if kind != "memory":
            continue
        rows.append([peer, fmt_num(b.get("bytes_per_slot_empty"), 1), fmt_num(b.get("bytes_per_slot_full"), 1),
                     fmt_num(b.get("bytes_per_slot_drained"), 1), fmt_num(b.get("fill_allocs_per_task"), 4),
                     fmt_num(b.get("reported_bytes_per_slot"), 1)])
    s = "Queues, capacity 16,384 (bytes from the heap per slot):\n\n"
    s += table(["peer", "constructed", "full", "after drain", "allocs per task while filling",
                "memory_bytes()/capacity"], rows)
    rows = []
    for (kind, peer), b in res.single.items():
        if kind != "memory.pool":
            continue
        rows.append([peer, fmt_num(b.get("bytes_per_block"), 2), fmt_num(b.get("bytes_per_block_all_held"), 2)])
    s += "\n\nBlock pools, 16,384 blocks (bytes from the heap per block):\n\n"
    s += table(["peer", "constructed", "with every block held"], rows)
    return s


def engine_table(res: Results) -> str:
    rows = []
    for name in res.peers("engine"):
        err = res.errors.get(("engine", name, "tput", 1))
        if err:
            rows.append([name, f"ERROR: {err}", "", "", "", ""])
            continue
        rows.append([name, fmt_ns(res.median("engine", name, "tput", 1, "median_ns")),
                     fmt_ns(res.median("engine", name, "tput", 1, "p99_ns")),
                     fmt_ns(res.maximum("engine", name, "tput", 1, "max_ns")),
                     fmt_num(res.median("engine", name, "tput", 1, "allocs_per_step"), 3),
                     str(res.reps("engine", name, "tput", 1))])
    if not rows:
        return "Not measured in this run (its --filter left the engine benchmarks out)."
    return ("256 running, 10,000 waiting; each step timed on its own; median and p99 over the steps of a "
            "repetition, then the median over repetitions; max over all.\n\n" +
            table(["benchmark", "median", "p99", "max", "allocs/step", "repetitions"], rows))


def spread_summary(res: Results) -> str:
    """How many throughput figures ran in more than one mode (repetitions further apart than WIDE_SPREAD)."""
    one, many = [0, 0], [0, 0]
    for (w, peer, flavour, n) in res.runs:
        v = res.spread(w, peer, flavour, n, "items_per_s") if flavour == "tput" and w != "engine" else None
        if v is None:
            continue
        bucket = one if n == 1 else many
        bucket[0] += v > WIDE_SPREAD
        bucket[1] += 1
    return (f"- Spread (largest over smallest repetition of items/s, column \"spread\"): above {WIDE_SPREAD} for "
            f"{one[0]} of {one[1]} figures at 1 thread and {many[0]} of {many[1]} at 2 or more. Such a figure "
            "ran in two or more modes (on a shared virtual machine, whole runs are slower or faster for reasons "
            "outside the process), and its median is one of them. Compare ratios taken in the same run; a goal "
            "whose verdict the repetitions do not settle (the best against the worst gives the other answer) "
            "says so.")


def write_report(res: Results, out: Path, meta: dict, rerendered_at: str | None = None) -> Path:
    ctx = res.context
    hw = int(ctx.get("tgi_hardware_threads") or ctx.get("num_cpus") or os.cpu_count() or 1)
    model = ctx.get("tgi_cpu_model", meta.get("machine", "unknown"))
    reps = meta.get("repetitions") or max((len(v) for v in res.runs.values()), default=0)
    lines = [
        "# tgi_gtc::scheduling benchmark report", "",
        f"- Machine: {model}, {hw} hardware threads (kernel {meta.get('kernel', '?')}); "
        f"TSC {1 / float(ctx.get('tgi_ns_per_tick', 1)):.3f} GHz",
        f"- Commit: `{meta.get('commit', '?')}`{' (uncommitted changes)' if meta.get('dirty') else ''}; "
        f"run {meta.get('started', ctx.get('date', '?'))}, {meta.get('wall_s', 0):.0f} s",
        f"- Command: `{meta.get('command', '?')}`",
    ]
    if rerendered_at:
        lines.append(f"- Rendered again from raw.json by `tools/bench_report.py --report-only` at commit "
                     f"`{rerendered_at}`: the goal verdicts are that script's, the figures the run's.")
    # Notes added to meta.json by hand, for what the script cannot know (where
    # the binary was built, what ran before it).
    lines += [f"- Note: {n}" for n in meta.get("notes", [])]
    lines += [
        f"- Load average (1, 5, 15 min) before the run {fmt_load(meta.get('loadavg_before'))}, after "
        f"{fmt_load(meta.get('loadavg_after'))} (the run's own threads raise the second){load_warning(meta, hw)}.",
        f"- Thread counts {ctx.get('tgi_thread_counts', '?')}; each figure is the median of {reps} repetitions "
        f"of a {float(ctx.get('tgi_duration_ms', 0)):.0f} ms fixed-duration run; max is the largest over them.",
        f"- Latency figures include the timer's own cost, {float(ctx.get('tgi_timer_overhead_ns', 0)):.0f} ns "
        "(an empty timed section), and come from separate timed runs (\"lat\"); throughput runs time nothing.",
        spread_summary(res),
        "",
        "## Goals", "",
        table(["goal", "measured", "verdict"], goals(res, hw)),
        "",
        "## Peers", "",
    ]
    info = res.peer_info("tgi_peer.")
    lines.append(table(["peer", "priorities", "FIFO", "progress", "cancel", "peek"],
                       [[p, i.get("priority", ""), i.get("fifo", ""), i.get("progress", ""), i.get("cancel", ""),
                         i.get("peek", "")] for p, i in info.items()]))
    lines += ["", "Cancel and peek workloads run only on the peers that have the operation.",
              "moodycamel4 is FIFO per producer only: two tasks of one priority scheduled by different "
              "threads may come out in either order.", "",
              "## Queue workloads", "",
              "Columns: items/s (median), spread (largest over smallest repetition; \"wide\" above "
              f"{WIDE_SPREAD}), fairness (slowest thread's successful operations over the fastest's, "
              "within each role), ns/item (wall time per item, all threads together), CPU ns/item (CPU time of "
              "all threads per item: for one thread the cost without waiting for a CPU), throughput ratio to "
              "seed_mutex and to atomic_queue1 at the same thread count, per-call latency percentiles, "
              "preempted /1k calls (the timed run's involuntary context switches per 1,000 calls: at most that "
              "many calls carry a preemption's wait in their latency; above 1, the p99.9 is likely such a call), "
              "fairness of the timed run, heap allocations per item.", ""]
    for w in QUEUE_ORDER:
        if not res.peers(w):
            continue
        lines += [f"### {w}", "", WORKLOAD_TEXT.get(w, ""), "", workload_table(res, w, QUEUE_BASELINES), ""]
    if res.peers("floor"):
        rows = [[str(n), fmt_ns(res.median("floor", "none", "lat", n, "p50_ns")),
                 fmt_ns(res.median("floor", "none", "lat", n, "p99_ns")),
                 fmt_ns(res.median("floor", "none", "lat", n, "p999_ns")),
                 fmt_ns(res.maximum("floor", "none", "lat", n, "max_ns")),
                 fmt_num(res.median("floor", "none", "lat", n, "preempted_per_kcall")),
                 fmt_num(res.median("floor", "none", "lat", n, "fairness"))] for n in res.threads()
                if res.reps("floor", "none", "lat", n)]
        lines += ["### Latency floor", "",
                  "The timed loop around an empty section, same threads and duration: the part of every "
                  "latency figure that is the timer, interrupts and the OS scheduler, not the queue. At "
                  "thread counts above the hardware threads the max here is a time slice the OS gave to "
                  "another thread; no queue can have a lower max.", "",
                  table(["threads", "p50", "p99", "p99.9", "max", "preempted /1k calls", "fairness"], rows), ""]
    lines += ["## Block pools", ""]
    pinfo = res.peer_info("tgi_pool.")
    if pinfo:
        lines += [table(["peer", "progress"], [[p, i.get("progress", "")] for p, i in pinfo.items()]), ""]
    for w in POOL_ORDER:
        if not res.peers(w):
            continue
        lines += [f"### {w}", "", WORKLOAD_TEXT.get(w, "") + "; item = one allocate+release", "",
                  workload_table(res, w, (POOL_BASELINE,)), ""]
    lines += ["## Memory", "", memory_tables(res), "", "## Engine step", "", engine_table(res), ""]
    errors = sorted(set((k[0], k[1], v) for k, v in res.errors.items()))
    if errors:
        lines += ["## Errors", "", table(["workload", "peer", "error"], [list(e) for e in errors]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(res: Results, out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_report: matplotlib missing, no plots", file=sys.stderr)
        return []
    written = []
    for counter, fname, ylabel, flavour in (("items_per_s", "throughput.svg", "items/s (median)", "tput"),
                                            ("p999_ns", "latency.svg", "p99.9 latency, ns", "lat")):
        workloads = [w for w in QUEUE_ORDER + POOL_ORDER
                     if any(res.reps(w, p, flavour, n) for p in res.peers(w) for n in res.threads())]
        if not workloads:
            continue
        cols = 4
        rows = math.ceil(len(workloads) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        # Queue peers: tab10, round markers; pool peers: Dark2, square markers,
        # dashed; the project: black and thick in both.
        colour, style = {PROJECT: "black"}, {PROJECT: ("o", "-")}
        for group, cmap, marker, line in ((QUEUE_ORDER, plt.get_cmap("tab10"), "o", "-"),
                                          (POOL_ORDER, plt.get_cmap("Dark2"), "s", "--")):
            others = []
            for w in group:
                others += [p for p in res.peers(w) if p != PROJECT and p not in others]
            for i, p in enumerate(others):
                colour[p] = cmap(i % cmap.N)
                style[p] = (marker, line)
        for ax, w in zip(axes.flat, workloads):
            for p in res.peers(w):
                xs, ys = [], []
                for n in res.threads():
                    v = res.median(w, p, flavour, n, counter)
                    if v:
                        xs.append(n)
                        ys.append(v)
                if xs:
                    ax.plot(xs, ys, marker=style[p][0], linestyle=style[p][1], label=p, color=colour[p],
                            linewidth=2.5 if p == PROJECT else 1.2)
            ax.set_title(w, fontsize=10)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("threads")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(workloads):]:
            ax.axis("off")
        handles, labels = [], []
        for ax in axes.flat:
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(h)
                    labels.append(label)
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=9)
        fig.suptitle(f"{res.context.get('tgi_cpu_model', '')}, {res.context.get('tgi_hardware_threads', '?')} "
                     f"hardware threads: {ylabel} vs threads")
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        path = out / fname
        fig.savefig(path, format="svg")
        plt.close(fig)
        written.append(path)
    return written


def ensure_matplotlib() -> None:
    """Debian's python3-matplotlib serves /usr/bin/python3; another python3 first
    on PATH (a virtualenv, pyenv) may lack it: re-run under the system one."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        system = "/usr/bin/python3"
        if os.path.exists(system) and os.path.realpath(sys.executable) != os.path.realpath(system) \
                and not os.environ.get("TGI_BENCH_REEXEC"):
            os.environ["TGI_BENCH_REEXEC"] = "1"
            os.execv(system, [system, *sys.argv])


def main() -> None:
    ensure_matplotlib()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="long run: 5 repetitions of 300 ms (default 3 of 100 ms)")
    ap.add_argument("--threads", help="thread counts, e.g. 1,2,4,8,16,32 (default: the binary's choice)")
    ap.add_argument("--out", help="output folder (default out/bench, or bench/results/<name> with --full)")
    ap.add_argument("--build-dir", default=str(ROOT / "build-bench"), help="CMake build folder (default build-bench)")
    ap.add_argument("--binary", help="path to tgi_bench (default <build-dir>/bench/tgi_bench)")
    ap.add_argument("--repetitions", type=int, help="override the repetitions")
    ap.add_argument("--duration-ms", type=float, help="override the length of one run")
    ap.add_argument("--filter", help="--benchmark_filter regex passed to the binary")
    ap.add_argument("--no-latency", action="store_true", help="skip the timed runs")
    ap.add_argument("--report-only", metavar="RAW_JSON", help="render report.md and plots from an existing raw.json")
    ap.add_argument("--quiet", action="store_true", help="do not echo the binary's console output")
    args = ap.parse_args()

    if args.report_only:
        raw_path = Path(args.report_only)
        out = raw_path.parent if args.out is None else Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta_path = raw_path.parent / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    else:
        out = resolve_out(args)
        raw_path = run_suite(args, out)
        meta = json.loads((out / "meta.json").read_text())
    res = Results(json.loads(raw_path.read_text()))
    rerendered_at = (git("rev-parse", "--short=10", "HEAD") or "nogit") if args.report_only else None
    report = write_report(res, out, meta, rerendered_at)
    plots = write_plots(res, out)
    print(f"bench_report: wrote {raw_path}, {report}" + "".join(f", {p}" for p in plots))


if __name__ == "__main__":
    main()
