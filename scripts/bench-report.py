#!/usr/bin/env python3
"""Cairn vs etcd 3.4 on this machine: the same cairn-bench loads against
fresh 1- and 3-member clusters of each, on loopback.

For every system, cluster size, mode (put, range-l, range-s, txn-put) and
client count (1, 10, 100, 1000 by default) it records throughput, latency
percentiles and the members' peak RSS (VmHWM, reset before each run), then
a few other modes at one client count (watch, watch-latency,
lease-keepalive). It also times the disk's fsync with dd, to set beside the
single-client put latency. Writes OUT/results.json, OUT/results.md (the
tables) and PNG plots; `--plot-only` redraws them from results.json.

    make bench-report                 # build, then run with the defaults
    scripts/bench-report.py --scale 0.2 --clients 1,100   # a quick look

Knobs: --scale multiplies every run's --total (1.0 keeps a full run under
ten minutes on 2 cores); --clients, --members, --modes, --systems narrow
it; --no-extras skips the watch and lease runs.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cluster import Cluster  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Requests per run at --scale 1, by mode and client count: enough for a few
# seconds each and for a p99 over thousands of samples at 10+ clients.
TOTALS = {
    "put": {1: 2000, 10: 10000, 100: 40000, 1000: 80000},
    "txn-put": {1: 2000, 10: 10000, 100: 40000, 1000: 80000},
    "range-l": {1: 10000, 10: 40000, 100: 100000, 1000: 100000},
    "range-s": {1: 10000, 10: 40000, 100: 100000, 1000: 100000},
}
KEY_SPACE = 100_000
KEY_SIZE = 8
VAL_SIZE = 256
RANGE_KEY = "/bench/range"
EXTRA_CLIENTS = 100
MAX_CONNS = 100
SYSTEM_LABEL = {"etcd": "etcd 3.4", "cairn": "Cairn"}


def total_for(mode, clients, scale):
    table = TOTALS[mode]
    base = table.get(clients) or table[max(c for c in table if c <= clients)]
    # At least a few requests per client, so every client gets to send.
    return max(int(base * scale), clients * 2, 10)


def mode_args(mode, total):
    common = [f"--total={total}"]
    if mode == "put":
        return ["put", *common, f"--key-size={KEY_SIZE}", f"--val-size={VAL_SIZE}",
                f"--key-space-size={KEY_SPACE}"]
    if mode == "txn-put":
        return ["txn-put", *common, f"--key-size={KEY_SIZE}", f"--val-size={VAL_SIZE}",
                f"--key-space-size={KEY_SPACE}"]
    if mode in ("range-l", "range-s"):
        return ["range", RANGE_KEY, *common, f"--consistency={mode[-1]}"]
    raise ValueError(mode)


def extra_runs(scale):
    """(mode, clients, args) of the other modes, at one client count."""
    return [
        ("watch", 10, ["watch", "--streams=10", "--watch-per-stream=100",
                       "--watched-key-total=10", "--key-space-size=10",
                       "--sequential-keys", f"--put-total={max(int(200 * scale), 10)}"]),
        ("watch-latency", EXTRA_CLIENTS,
         ["watch-latency", f"--total={max(int(300 * scale), 10)}", "--put-rate=100"]),
        ("lease-keepalive", EXTRA_CLIENTS,
         ["lease-keepalive", f"--total={max(int(50000 * scale), 100)}"]),
    ]


def run_bench(bench, endpoints, clients, args, timeout):
    conns = min(clients, MAX_CONNS)
    cmd = [bench, f"--endpoints={','.join(endpoints)}", f"--clients={clients}",
           f"--conns={conns}", "--json", *args]
    started = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout}s", "command": cmd}
    if p.returncode != 0:
        return {"failed": p.stderr.strip()[-500:], "command": cmd}
    result = json.loads(p.stdout)
    result["wall_seconds"] = time.monotonic() - started
    return result


def measure_fsync(directory, writes=2000):
    """Milliseconds per 4 KiB O_DSYNC write, as dd reports it: appending to a
    new file (every write also commits the file's new size), then
    overwriting that file in place (data only, as a preallocated log)."""
    path = os.path.join(directory, "fsync-probe")
    dd = ["dd", "if=/dev/zero", f"of={path}", "bs=4k", f"count={writes}", "oflag=dsync"]

    def per_write(cmd):
        p = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"copied, ([0-9.]+) s", p.stderr)
        return float(m.group(1)) * 1000 / writes if m else None

    append = per_write(dd)
    overwrite = per_write(dd + ["conv=notrunc"])
    os.unlink(path)
    return append, overwrite


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine():
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])

    def out(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return ""

    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "etcd_version": out("etcd", "--version").splitlines()[0] if out("etcd", "--version") else "",
        "cairn_commit": out("git", "rev-parse", "--short", "HEAD"),
    }


def run_all(opts):
    systems = {"etcd": opts.etcd, "cairn": opts.cairn}
    results = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_before": loadavg(),
        "settings": {
            "scale": opts.scale, "key_size": KEY_SIZE, "val_size": VAL_SIZE,
            "key_space": KEY_SPACE, "max_conns": MAX_CONNS, "range_key": RANGE_KEY,
        },
        "runs": [],
        "extras": [],
        "idle_rss_mib": {},
    }
    scratch = tempfile.mkdtemp(prefix="bench-report-")
    results["fsync_ms"], results["fsync_overwrite_ms"] = measure_fsync(scratch)
    print(f"fsync (dd 4k oflag=dsync): {fmt(results['fsync_ms'], 3)} ms per appending write, "
          f"{fmt(results['fsync_overwrite_ms'], 3)} ms overwriting", file=sys.stderr)
    for members in opts.members:
        # Both systems' clusters stay up side by side and take turns run by
        # run, so drift in the machine's other load hits both alike (an idle
        # cluster costs little: heartbeats).
        clusters = {}
        try:
            for system in opts.systems:
                cluster = Cluster(systems[system], members, f"{system}-{members}",
                                  parent_dir=scratch)
                clusters[system] = cluster
                cluster.start()
                cluster.etcdctl("put", RANGE_KEY, "v" * VAL_SIZE)
                results["idle_rss_mib"][cluster.tag] = cluster.rss_mib()
            plan = [(mode, clients, mode_args(mode, total_for(mode, clients, opts.scale)))
                    for mode in opts.modes for clients in opts.clients]
            extras = extra_runs(opts.scale) if opts.extras else []
            for kind, runs in (("runs", plan), ("extras", extras)):
                for mode, clients, args in runs:
                    for system, cluster in clusters.items():
                        cluster.reset_peak_rss()
                        r = run_bench(opts.bench, cluster.endpoints, clients, args, opts.timeout)
                        rss = cluster.peak_rss_mib()
                        r.update(system=system, members=members, mode=mode, clients=clients,
                                 rss_peak_mib=max(rss), rss_peak_sum_mib=sum(rss))
                        results[kind].append(r)
                        report(cluster.tag, mode, clients, r)
        finally:
            for cluster in clusters.values():
                cluster.stop()
    os.rmdir(scratch)
    results["load_after"] = loadavg()
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return results


def report(tag, mode, clients, r):
    if "failed" in r:
        print(f"{tag:8} {mode:15} {clients:5} FAILED {r['failed']}", file=sys.stderr)
    else:
        print(f"{tag:8} {mode:15} {clients:5} {r['rps']:10.0f}/s p99 {r['p99'] * 1000:8.2f} ms "
              f"errors {r['errors']} rss {r['rss_peak_mib']:.0f} MiB ({r['wall_seconds']:.1f}s)",
              file=sys.stderr)


def find(runs, **match):
    for r in runs:
        if all(r.get(k) == v for k, v in match.items()) and "failed" not in r:
            return r
    return None


def fmt(x, digits=0):
    return "—" if x is None else f"{x:,.{digits}f}"


def tables(results):
    runs = results["runs"]
    members_all = sorted({r["members"] for r in runs})
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    clients_all = sorted({r["clients"] for r in runs})
    lines = []
    m = results["machine"]
    lines.append(f"Run {results['started']} to {results.get('finished', '?')}, "
                 f"{m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
                 f"{m['etcd_version']}, Cairn {m['cairn_commit']}; load average "
                 f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after; "
                 f"--scale {results['settings']['scale']}.")
    lines.append("")
    for members in members_all:
        lines.append(f"### {members} member{'s' if members > 1 else ''}")
        lines.append("")
        lines.append("| mode | clients | etcd req/s | Cairn req/s | Cairn/etcd | etcd p99 ms "
                     "| Cairn p99 ms | etcd peak RSS MiB | Cairn peak RSS MiB | errors etcd/Cairn |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for mode in modes:
            for clients in clients_all:
                e = find(runs, system="etcd", members=members, mode=mode, clients=clients)
                c = find(runs, system="cairn", members=members, mode=mode, clients=clients)
                ratio = c["rps"] / e["rps"] if e and c and e["rps"] else None
                lines.append(
                    f"| {mode} | {clients} | {fmt(e and e['rps'])} | {fmt(c and c['rps'])} "
                    f"| {fmt(ratio, 2)} | {fmt(e and e['p99'] * 1000, 2)} "
                    f"| {fmt(c and c['p99'] * 1000, 2)} | {fmt(e and e['rss_peak_mib'])} "
                    f"| {fmt(c and c['rss_peak_mib'])} "
                    f"| {e['errors'] if e else '—'}/{c['errors'] if c else '—'} |")
        lines.append("")
    extras = results.get("extras", [])
    if extras:
        lines.append("### Other modes")
        lines.append("")
        lines.append("| mode | members | clients | etcd per s | Cairn per s | etcd p50 ms "
                     "| Cairn p50 ms | etcd p99 ms | Cairn p99 ms | errors etcd/Cairn |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for members in members_all:
            for name in dict.fromkeys(r["mode"] for r in extras):
                e = find(extras, system="etcd", members=members, mode=name)
                c = find(extras, system="cairn", members=members, mode=name)
                clients = (e or c or {}).get("clients", "—")
                lines.append(
                    f"| {name} | {members} | {clients} | {fmt(e and e['rps'])} "
                    f"| {fmt(c and c['rps'])} | {fmt(e and e['p50'] * 1000, 2)} "
                    f"| {fmt(c and c['p50'] * 1000, 2)} | {fmt(e and e['p99'] * 1000, 2)} "
                    f"| {fmt(c and c['p99'] * 1000, 2)} "
                    f"| {e['errors'] if e else '—'}/{c['errors'] if c else '—'} |")
        lines.append("")
    fsync = results.get("fsync_ms")
    e = find(runs, system="etcd", members=1, mode="put", clients=1)
    c = find(runs, system="cairn", members=1, mode="put", clients=1)
    lines.append("### Single-client put vs the disk's fsync")
    lines.append("")
    lines.append("| dd bs=4k oflag=dsync, appending | same, overwriting in place "
                 "| etcd put p50, 1 client, 1 member | Cairn put p50, 1 client, 1 member |")
    lines.append("|---:|---:|---:|---:|")
    lines.append(f"| {fmt(fsync, 2)} ms | {fmt(results.get('fsync_overwrite_ms'), 2)} ms "
                 f"| {fmt(e and e['p50'] * 1000, 2)} ms | {fmt(c and c['p50'] * 1000, 2)} ms |")
    lines.append("")
    idle = results.get("idle_rss_mib", {})
    if idle:
        lines.append("### Memory of a fresh cluster")
        lines.append("")
        lines.append("RSS of each member right after start (one key written), MiB: "
                     + "; ".join(f"{tag}: {', '.join(f'{x:.0f}' for x in rss)}"
                                 for tag, rss in idle.items()) + ".")
        lines.append("")
    failed = [r for r in runs + extras if "failed" in r]
    if failed:
        lines.append("Failed runs:")
        for r in failed:
            lines.append(f"- {r['system']} {r['members']} members {r['mode']} "
                         f"{r['clients']} clients: {r['failed']}")
        lines.append("")
    return "\n".join(lines)


STYLE = {
    ("etcd", 1): dict(color="tab:blue", linestyle="-", marker="o"),
    ("etcd", 3): dict(color="tab:blue", linestyle="--", marker="s"),
    ("cairn", 1): dict(color="tab:orange", linestyle="-", marker="o"),
    ("cairn", 3): dict(color="tab:orange", linestyle="--", marker="s"),
}


def plots(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "failed" not in r]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    series = sorted({(r["system"], r["members"]) for r in runs})
    files = []
    for metric, ylabel, fname, logy in [
        ("rps", "requests/s", "throughput.png", False),
        ("p99", "p99 latency (ms)", "latency-p99.png", True),
    ]:
        cols = 2
        rows = (len(modes) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(11, 4 * rows), squeeze=False)
        for ax, mode in zip(axes.flat, modes):
            for system, members in series:
                pts = sorted((r["clients"], r[metric]) for r in runs
                             if r["mode"] == mode and r["system"] == system
                             and r["members"] == members)
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ys = [p[1] * (1000 if metric == "p99" else 1) for p in pts]
                ax.plot(xs, ys, label=f"{SYSTEM_LABEL[system]}, {members} member"
                        + ("s" if members > 1 else ""),
                        **STYLE.get((system, members), {}))
            ax.set_xscale("log")
            if logy:
                ax.set_yscale("log")
            ax.set_title(mode)
            ax.set_xlabel("clients")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(modes):]:
            ax.axis("off")
        fig.suptitle(f"{ylabel} vs clients — {results['machine']['cpus']} CPUs, loopback")
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=90)
        plt.close(fig)
        files.append(fname)

    # Peak RSS of the largest member, per mode, at the most clients run.
    most = max(r["clients"] for r in runs)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(series), 1)
    for i, (system, members) in enumerate(series):
        ys = []
        for mode in modes:
            r = find(runs, system=system, members=members, mode=mode, clients=most)
            ys.append(r["rss_peak_mib"] if r else 0)
        ax.bar([j + i * width for j in range(len(modes))], ys, width,
               label=f"{SYSTEM_LABEL[system]}, {members} member" + ("s" if members > 1 else ""),
               color=STYLE.get((system, members), {}).get("color"),
               hatch="//" if members > 1 else None, edgecolor="black", linewidth=0.5)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(modes))])
    ax.set_xticklabels(modes)
    ax.set_ylabel("peak RSS of a member (MiB)")
    ax.set_title(f"Member memory during each benchmark ({most} clients)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "memory.png"), dpi=90)
    plt.close(fig)
    files.append("memory.png")
    return files


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cairn", default=os.path.join(ROOT, "target/release/cairn"))
    p.add_argument("--etcd", default="/usr/bin/etcd")
    p.add_argument("--bench", default=os.path.join(ROOT, "target/release/cairn-bench"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs/bench"))
    p.add_argument("--systems", default="etcd,cairn")
    p.add_argument("--members", default="1,3")
    p.add_argument("--clients", default="1,10,100,1000")
    p.add_argument("--modes", default="put,range-l,range-s,txn-put")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiplies every run's --total")
    p.add_argument("--timeout", type=float, default=180, help="seconds per run")
    p.add_argument("--no-extras", dest="extras", action="store_false",
                   help="skip the watch, watch-latency and lease-keepalive runs")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw tables and plots from OUT/results.json")
    opts = p.parse_args()
    opts.systems = opts.systems.split(",")
    opts.members = [int(x) for x in opts.members.split(",")]
    opts.clients = [int(x) for x in opts.clients.split(",")]
    opts.modes = opts.modes.split(",")
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "results.json")
    if opts.plot_only:
        with open(path) as f:
            results = json.load(f)
    else:
        for binary in (opts.bench, opts.cairn, opts.etcd):
            if not os.access(binary, os.X_OK):
                sys.exit(f"not an executable: {binary}")
        started = time.monotonic()
        results = run_all(opts)
        print(f"all runs took {time.monotonic() - started:.0f}s", file=sys.stderr)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    md = tables(results)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(md + "\n")
    files = plots(results, opts.out)
    print(md)
    print(f"wrote {path}, results.md and {', '.join(files)} in {opts.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
