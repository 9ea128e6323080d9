#!/usr/bin/env python3
"""``make bench``: the proxy against nginx, Node's http-proxy, WSGIProxy2 and
the bare origin, on loopback, driven by wrk. See bench/README.md.

Installs what it needs (nginx and wrk from apt, http-proxy from npm into
bench/node_modules, WSGIProxy2 and matplotlib into bench/.venv), prints one
table, and writes bench/results/latest.json and bench/results/latest.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import MIB, PROXY_VENV, RESULTS, log  # noqa: E402

#: Server keys in table order, with the names the table shows.
SERVERS = {
    "proxy": "proxy (this repo)",
    "node": "Node http-proxy",
    "wsgiproxy2": "WSGIProxy2",
    "nginx": "nginx proxy",
    "origin": "origin direct",
}


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    path: str
    connections: int
    quick_connections: int
    #: ``rps``, ``mb_per_s_down`` or ``mb_per_s_up``: what the ratios compare.
    metric: str = "rps"
    headers: tuple[str, ...] = ()
    post_bytes: int | None = None
    #: Measured runs per server, servers interleaved round by round; the
    #: table shows the median of each number. The scenarios that carry
    #: targets get 3, so that one noisy run cannot decide a ratio.
    rounds: int = 1


SCENARIOS = (
    Scenario("1k_keepalive", "1 KiB GET, 50 keep-alive conns", "/1k", 50, 10, rounds=3),
    Scenario("1k_500conns", "1 KiB GET, 500 keep-alive conns", "/1k", 500, 50),
    Scenario("1m_download", "1 MiB GET, 10 conns (MB/s)", "/1m", 10, 4, "mb_per_s_down", rounds=3),
    Scenario("1m_upload", "1 MiB POST, 10 conns (MB/s up)", "/upload", 10, 4, "mb_per_s_up", post_bytes=MIB),
    Scenario("1k_new_conn", "1 KiB GET, new conn per request, 50 conns", "/1k", 50, 10, headers=("Connection: close",)),
)


@dataclass(frozen=True)
class Target:
    key: str
    description: str
    value: float | None
    threshold: float
    #: ``ge``: value must be >= threshold; ``le``: <=; ``lt``: <.
    op: str

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        if self.op == "ge":
            return self.value >= self.threshold
        if self.op == "le":
            return self.value <= self.threshold
        return self.value < self.threshold

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def target_line(target: Target) -> str:
    sign = {"ge": ">=", "le": "<=", "lt": "<"}[target.op]
    verdict = {True: "PASS", False: "FAIL", None: "n/a "}[target.passed]
    value = "n/a" if target.value is None else f"{target.value:.2f}"
    return f"  {verdict}  {target.description:<58} {value:>9} (need {sign} {target.threshold:g})"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s per wrk run, fewer connections")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 10, --quick 1)")
    p.add_argument("--warmup", type=int, help="seconds of unmeasured warm-up before each run (default 2, --quick 1)")
    p.add_argument(
        "--workers", type=int, default=harness.cpus(), help="workers for the Gunicorn proxies (default: CPUs)"
    )
    p.add_argument("--origin-workers", type=int, default=1, help="nginx origin worker processes (default 1)")
    p.add_argument("--threads", type=int, default=harness.cpus(), help="wrk threads (default: CPUs)")
    p.add_argument("--only", help="comma-separated servers to run: " + ",".join(SERVERS))
    p.add_argument("--scenarios", help="comma-separated scenarios: " + ",".join(s.key for s in SCENARIOS))
    p.add_argument(
        "--proxy-python",
        type=Path,
        default=PROXY_VENV / "bin" / "python",
        help="Python of the proxy's venv (default: .venv, made from the lock files if missing)",
    )
    p.add_argument("--no-install", action="store_true", help="do not install anything; fail if something is missing")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="JSON results (the PNG goes beside it)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the temp dir with configs and logs")
    p.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    args = p.parse_args(argv)
    args.duration = args.duration or (1 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.servers = [s.strip() for s in args.only.split(",")] if args.only else list(SERVERS)
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
    keys = [s.strip() for s in args.scenarios.split(",")] if args.scenarios else [s.key for s in SCENARIOS]
    args.scenario_list = [s for s in SCENARIOS if s.key in keys]
    if len(args.scenario_list) != len(keys):
        p.error("unknown scenario in --scenarios")
    return args


def start_servers(services: harness.Services, args: argparse.Namespace) -> dict[str, harness.Server]:
    origin = services.origin(workers=args.origin_workers)
    started: dict[str, harness.Server] = {}
    for key in args.servers:
        log(f"starting {SERVERS[key]}")
        if key == "origin":
            started[key] = origin
        elif key == "proxy":
            started[key] = services.proxy(origin, workers=args.workers, access_log=True)
        elif key == "node":
            started[key] = services.node_proxy(origin)
        elif key == "wsgiproxy2":
            started[key] = services.wsgiproxy(origin, workers=args.workers)
        elif key == "nginx":
            started[key] = services.nginx_proxy(origin)
    for server in started.values():
        harness.sanity_check(server)
    return started


def run_all(args: argparse.Namespace, servers: dict[str, harness.Server]) -> list[dict]:
    scenarios = []
    for scenario in args.scenario_list:
        connections = scenario.quick_connections if args.quick else scenario.connections
        rounds = 1 if args.quick else scenario.rounds
        runs: dict[str, list[dict]] = {key: [] for key in servers}
        for round_ in range(rounds):
            for key, server in servers.items():
                run = dict(
                    url=server.url + scenario.path,
                    connections=connections,
                    threads=args.threads,
                    headers=scenario.headers,
                    post_bytes=scenario.post_bytes,
                )
                if args.warmup and round_ == 0:
                    # Same load, unmeasured: upstream pools and caches reach this scenario's size.
                    harness.wrk(duration=args.warmup, **run)
                log(f"{scenario.key}: {SERVERS[key]}, {connections} conns, {args.duration} s, round {round_ + 1}")
                runs[key].append(harness.wrk(duration=args.duration, **run))
                time.sleep(0.5)
        results = {key: median_result(server_runs) for key, server_runs in runs.items()}
        scenarios.append({**asdict(scenario), "connections": connections, "results": results})
    return scenarios


def median_result(runs: list[dict]) -> dict:
    """One result from several runs of the same load: the median of each
    number, errors summed; every run is kept under ``runs``."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for field in ("rps", "mb_per_s_down", "mb_per_s_up"):
        out[field] = statistics.median(r[field] for r in runs)
    out["latency_us"] = {name: statistics.median(r["latency_us"][name] for r in runs) for name in runs[0]["latency_us"]}
    out["errors_total"] = sum(r["errors_total"] for r in runs)
    out["runs"] = runs
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compute_targets(scenarios: list[dict]) -> list[Target]:
    by_key = {s["key"]: s["results"] for s in scenarios}

    def value(scenario: str, server: str, field: str) -> float | None:
        result = by_key.get(scenario, {}).get(server)
        if result is None:
            return None
        return result["latency_us"]["p99"] if field == "p99" else result[field]

    return [
        Target(
            "rps_vs_node",
            "1 KiB keep-alive req/s: proxy / Node http-proxy",
            _ratio(value("1k_keepalive", "proxy", "rps"), value("1k_keepalive", "node", "rps")),
            0.5,
            "ge",
        ),
        Target(
            "rps_vs_wsgiproxy2",
            "1 KiB keep-alive req/s: proxy / WSGIProxy2",
            _ratio(value("1k_keepalive", "proxy", "rps"), value("1k_keepalive", "wsgiproxy2", "rps")),
            1.5,
            "ge",
        ),
        Target(
            "p99_vs_node",
            "1 KiB keep-alive p99: proxy / Node http-proxy",
            _ratio(value("1k_keepalive", "proxy", "p99"), value("1k_keepalive", "node", "p99")),
            2.0,
            "le",
        ),
        Target(
            "mb_vs_node",
            "1 MiB download MB/s: proxy / Node http-proxy",
            _ratio(value("1m_download", "proxy", "mb_per_s_down"), value("1m_download", "node", "mb_per_s_down")),
            1.0,
            "ge",
        ),
    ]


def format_table(scenarios: list[dict]) -> str:
    head = (
        f"{'scenario':<42} {'server':<18} {'req/s':>9} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7} {'x proxy':>8} {'p99 x proxy':>11}"
    )
    lines = [head, "-" * len(head)]
    for scenario in scenarios:
        results = scenario["results"]
        metric = scenario["metric"]
        base = results.get("proxy")
        for i, (key, r) in enumerate(results.items()):
            mb = r["mb_per_s_up"] if metric == "mb_per_s_up" else r["mb_per_s_down"]
            ratio = _ratio(r[metric], base[metric]) if base else None
            p99_ratio = _ratio(r["latency_us"]["p99"], base["latency_us"]["p99"]) if base else None
            title = scenario["title"] if i == 0 else ""
            lines.append(
                f"{title:<42} {SERVERS[key]:<18} {r['rps']:>9.0f} {mb:>8.1f} "
                f"{r['latency_us']['p50'] / 1000:>8.2f} {r['latency_us']['p99'] / 1000:>8.2f} "
                f"{r['errors_total']:>7} {'-' if ratio is None else f'{ratio:.2f}':>8} "
                f"{'-' if p99_ratio is None else f'{p99_ratio:.2f}':>11}"
            )
        lines.append("")
    return "\n".join(lines)


def draw_chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = data["scenarios"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    colours = {"proxy": "#d62728", "node": "#2ca02c", "wsgiproxy2": "#9467bd", "nginx": "#1f77b4", "origin": "#7f7f7f"}
    for ax, scenario in zip(axes.flat, scenarios, strict=False):
        metric = scenario["metric"]
        keys = list(scenario["results"])
        values = [scenario["results"][k][metric] for k in keys]
        bars = ax.bar([SERVERS[k] for k in keys], values, color=[colours[k] for k in keys])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(scenario["title"], fontsize=10)
        ax.set_ylabel({"rps": "requests/s", "mb_per_s_down": "MB/s", "mb_per_s_up": "MB/s uploaded"}[metric])
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    latency = next((s for s in scenarios if s["key"] == "1k_keepalive"), None)
    ax = axes.flat[len(scenarios)] if len(scenarios) < 6 else None
    if ax is not None and latency is not None:
        keys = list(latency["results"])
        x = range(len(keys))
        p50 = [latency["results"][k]["latency_us"]["p50"] / 1000 for k in keys]
        p99 = [latency["results"][k]["latency_us"]["p99"] / 1000 for k in keys]
        ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50", color="#aec7e8")
        ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99", color="#1f77b4")
        ax.set_xticks(list(x), [SERVERS[k] for k in keys], rotation=30, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title("Latency, 1 KiB GET, 50 keep-alive conns", fontsize=10)
        ax.legend()
    for extra in list(axes.flat)[len(scenarios) + (1 if latency else 0) :]:
        extra.axis("off")
    meta = data["meta"]
    fig.suptitle(
        f"edge proxy benchmark {meta['date']} ({meta['versions']['cpus']} CPUs, {meta['duration_s']} s per run"
        f"{', QUICK SMOKE RUN: numbers meaningless' if meta['quick'] else ''})",
        fontsize=12,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.no_install:
        harness.install_everything(args.proxy_python)
    harness.reexec_in_bench_venv()
    harness.raise_nofile()
    services = harness.Services(args.proxy_python)
    started_at = time.time()
    try:
        servers = start_servers(services, args)
        scenarios = run_all(args, servers)
        proxy = servers.get("proxy")
        access_lines = None
        if proxy is not None:
            access_log = services.tmp / "proxy" / "log" / "access.log"
            access_lines = sum(1 for _ in access_log.open("rb")) if access_log.exists() else 0
    finally:
        services.cleanup(keep=args.keep_scratch)

    targets = compute_targets(scenarios)
    data = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at)),
            "elapsed_s": round(time.time() - started_at, 1),
            "quick": args.quick,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "proxy_workers": args.workers,
            "origin_workers": args.origin_workers,
            "wrk_threads": args.threads,
            "proxy_access_log_lines": access_lines,
            "versions": harness.versions(args.proxy_python),
        },
        "scenarios": scenarios,
        "targets": [t.as_dict() for t in targets],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    draw_chart(data, png)

    print()
    print(
        f"edge proxy benchmark, {data['meta']['date']}: {args.duration} s per run, "
        f"{args.workers} proxy workers, {harness.cpus()} CPUs, wrk -t{args.threads}"
        + ("  [QUICK SMOKE RUN: numbers are meaningless]" if args.quick else "")
    )
    print("x proxy = this row's req/s (MB/s for the 1 MiB rows) / the proxy's; p99 x proxy likewise for p99")
    print("rows of scenarios run in several rounds show the median of each number\n")
    print(format_table(scenarios))
    print("Targets (ratios measured in this run):")
    for target in targets:
        print(target_line(target))
    if access_lines is not None:
        print(f"\nproxy access log: {access_lines} lines written during the run")
    print(f"results: {args.out}\nchart:   {png}")
    # The response reader against h11, in-process (docs/architecture.md).
    reader_compare = [str(args.proxy_python), str(Path(__file__).with_name("reader_compare.py"))]
    subprocess.run(reader_compare + (["--quick"] if args.quick else []), check=False)
    if args.check and any(t.passed is False for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
