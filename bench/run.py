#!/usr/bin/env python3
"""``make bench``: the proxy against nginx, Node's http-proxy, WSGIProxy2 and
the bare origin, on loopback, driven by wrk. See bench/README.md.

Two modes: per core (each proxy pinned to a CPU of its own with one worker,
wrk and the origin on another CPU: the headline) and all cores (every
process on every CPU, the proxies with their default process counts).

Installs what it needs (nginx and wrk from apt, http-proxy from npm into
bench/node_modules, WSGIProxy2 and matplotlib into bench/.venv), prints a
table per mode, and writes bench/results/latest.json and one chart per mode
beside it (latest-per-core.png, latest-all-cores.png).
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
    "proxy_cache": "proxy, cache on",
    "nginx_cache": "nginx proxy_cache",
    "proxy_metrics_off": "proxy, metrics off",
}
#: The servers of the pass-through scenarios.
PLAIN = ("proxy", "node", "wsgiproxy2", "nginx", "origin")
#: The cache scenarios' servers: the caches, and this proxy without its cache.
CACHES = ("proxy_cache", "nginx_cache", "proxy")
#: The stampede scenario: clients asking at once for one expired 1 MiB object.
STAMPEDE_CLIENTS = 100
#: Largest growth of the caching proxy's worker RSS over its hit scenarios.
RSS_GROWTH_LIMIT = 8 * MIB


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
    #: The same in the per-core mode, where every scenario but one carries a target.
    per_core_rounds: int = 3
    servers: tuple[str, ...] = PLAIN
    #: Fresh servers for every round: two instances of one build differ by up
    #: to 7% here (where their memory lands, measured 2026-12-02), more than
    #: the few µs per request an A/B of two builds looks for.
    fresh_servers: bool = False


SCENARIOS = (
    Scenario("1k_keepalive", "1 KiB GET, 50 keep-alive conns", "/1k", 50, 10, rounds=3),
    Scenario("1k_500conns", "1 KiB GET, 500 keep-alive conns", "/1k", 500, 50, per_core_rounds=1),
    Scenario("1m_download", "1 MiB GET, 10 conns (MB/s)", "/1m", 10, 4, "mb_per_s_down", rounds=3),
    Scenario("1m_upload", "1 MiB POST, 10 conns (MB/s up)", "/upload", 10, 4, "mb_per_s_up", post_bytes=MIB),
    Scenario("1k_new_conn", "1 KiB GET, new conn per request, 50 conns", "/1k", 50, 10, headers=("Connection: close",)),
    Scenario("1k_cache_hits", "1 KiB cache hits, 50 conns", "/cached/1k", 50, 10, rounds=3, servers=CACHES),
    Scenario(
        "1m_cache_hits", "1 MiB cache hits, 10 conns (MB/s)", "/cached/1m", 10, 4, "mb_per_s_down", servers=CACHES
    ),
    # The cost of the Prometheus metrics (docs/metrics.md): the proxy with them on and off.
    # An A/B of two builds of one server: fresh servers each round, more rounds, and the
    # target is the median of the rounds' ratios (the two runs of a round are adjacent).
    Scenario(
        "1k_metrics",
        "1 KiB GET, 50 keep-alive conns: metrics on / off",
        "/1k",
        50,
        10,
        rounds=3,
        per_core_rounds=7,
        servers=("proxy", "proxy_metrics_off"),
        fresh_servers=True,
    ),
)


@dataclass(frozen=True)
class Target:
    key: str
    description: str
    value: float | None
    threshold: float
    #: ``ge``: value must be >= threshold; ``le``: <=; ``lt``: <.
    op: str
    #: A further threshold worth reaching, printed but never failing ``--check``.
    moonshot: float | None = None
    #: The proxy's worker CPU per request in this target's scenario.
    proxy_cpu_us_per_request: float | None = None

    def meets(self, threshold: float) -> bool | None:
        if self.value is None:
            return None
        if self.op == "ge":
            return self.value >= threshold
        if self.op == "le":
            return self.value <= threshold
        return self.value < threshold

    @property
    def passed(self) -> bool | None:
        return self.meets(self.threshold)

    def as_dict(self) -> dict:
        moonshot = None if self.moonshot is None else self.meets(self.moonshot)
        return {**asdict(self), "passed": self.passed, "moonshot_passed": moonshot}


_VERDICT = {True: "PASS", False: "FAIL", None: "n/a "}


def target_line(target: Target) -> str:
    sign = {"ge": ">=", "le": "<=", "lt": "<"}[target.op]
    value = "n/a" if target.value is None else f"{target.value:.2f}"
    line = f"  {_VERDICT[target.passed]}  {target.description:<58} {value:>9} (need {sign} {target.threshold:g})"
    if target.moonshot is not None:
        line += f"  moonshot {sign} {target.moonshot:g}: {_VERDICT[target.meets(target.moonshot)].strip()}"
    if target.proxy_cpu_us_per_request is not None:
        line += f"  proxy {target.proxy_cpu_us_per_request:.0f} µs CPU/req"
    return line


@dataclass(frozen=True)
class Mode:
    """How the servers are started and where they run."""

    key: str
    title: str
    proxy_workers: int
    origin_workers: int
    wrk_threads: int
    #: nginx as a proxy buffers answers (its default) or streams them.
    nginx_response_buffering: bool
    #: CPUs of every proxy under test / of wrk and the origin; None: unpinned.
    proxy_cpus: frozenset[int] | None = None
    load_cpus: frozenset[int] | None = None

    @property
    def pinned(self) -> bool:
        return self.proxy_cpus is not None

    def rounds(self, scenario: Scenario, quick: bool) -> int:
        if quick:
            return 1
        return scenario.per_core_rounds if self.pinned else scenario.rounds


def per_core_mode(layout: harness.PerCoreLayout) -> Mode:
    return Mode(
        "per_core",
        "per core",
        proxy_workers=1,
        origin_workers=1,
        wrk_threads=1,
        nginx_response_buffering=False,
        proxy_cpus=layout.proxy_cpus,
        load_cpus=layout.load_cpus,
    )


def all_cores_mode(args: argparse.Namespace) -> Mode:
    return Mode(
        "all_cores",
        "all cores",
        proxy_workers=args.workers,
        origin_workers=args.origin_workers,
        wrk_threads=args.threads,
        nginx_response_buffering=True,
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--mode",
        choices=("per-core", "all-cores", "both"),
        default="both",
        help="per-core: each proxy pinned to one CPU, one worker; all-cores: unpinned, default process counts",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s per wrk run, fewer connections")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 10, --quick 1)")
    p.add_argument("--warmup", type=int, help="seconds of unmeasured warm-up before each run (default 2, --quick 1)")
    p.add_argument(
        "--workers",
        type=int,
        default=harness.cpus(),
        help="all-cores mode: workers for the Gunicorn proxies (default: CPUs)",
    )
    p.add_argument(
        "--origin-workers", type=int, default=1, help="all-cores mode: nginx origin worker processes (default 1)"
    )
    p.add_argument("--threads", type=int, default=harness.cpus(), help="all-cores mode: wrk threads (default: CPUs)")
    p.add_argument("--only", help="comma-separated servers to run: " + ",".join(SERVERS))
    p.add_argument("--scenarios", help="comma-separated scenarios: " + ",".join(s.key for s in SCENARIOS))
    p.add_argument(
        "--proxy-python",
        type=Path,
        default=PROXY_VENV / "bin" / "python",
        help="Python of the proxy's venv (default: bench/.proxy-venv, the image's interpreter and lock file)",
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


def start_servers(services: harness.Services, args: argparse.Namespace, mode: Mode) -> dict[str, harness.Server]:
    origin = services.origin(workers=mode.origin_workers, cpus=mode.load_cpus)
    started = {key: origin if key == "origin" else start_server(services, key, origin, mode) for key in args.servers}
    for server in started.values():
        harness.sanity_check(server)
    return started


def start_server(services: harness.Services, key: str, origin: harness.Server, mode: Mode) -> harness.Server:
    """One proxy under test (not the origin), pinned as ``mode`` says."""
    log(f"starting {SERVERS[key]} ({mode.title})")
    pin = mode.proxy_cpus
    if key == "proxy":
        return services.proxy(origin, workers=mode.proxy_workers, access_log=True, cpus=pin)
    if key == "node":
        return services.node_proxy(origin, cpus=pin)
    if key == "wsgiproxy2":
        return services.wsgiproxy(origin, workers=mode.proxy_workers, cpus=pin)
    if key == "nginx":
        return services.nginx_proxy(origin, response_buffering=mode.nginx_response_buffering, cpus=pin)
    if key == "proxy_cache":
        return services.proxy(
            origin, workers=mode.proxy_workers, access_log=True, cpus=pin, name="proxy-cache", cache=True
        )
    if key == "proxy_metrics_off":
        return services.proxy(
            origin, workers=mode.proxy_workers, access_log=True, cpus=pin, name="proxy-metrics-off", metrics=False
        )
    if key == "nginx_cache":
        return services.nginx_proxy(origin, cpus=pin, cache=True, name="nginx-cache")
    raise ValueError(f"unknown server {key}")


def restart(services: harness.Services, servers: dict[str, harness.Server], keys: list[str], mode: Mode) -> None:
    """Replace the servers ``keys`` with fresh ones (same settings, same CPUs)."""
    origin = next(s for s in services.servers if s.name == "origin")
    for key in keys:
        services.stop(servers[key])
        servers[key] = start_server(services, key, origin, mode)
        harness.sanity_check(servers[key])


def pinning(services: harness.Services, mode: Mode) -> dict[str, list[dict]]:
    """Each running server's processes (the origin's too) and the CPUs the
    kernel lets them use; in the per-core mode, raises unless each is pinned
    where it should be."""
    out = {}
    for server in services.servers:
        out[server.name] = harness.pinning(server)
        if mode.pinned:
            want = mode.load_cpus if server.name == "origin" else mode.proxy_cpus
            harness.check_pinning(SERVERS.get(server.name, server.name), out[server.name], want)
    return out


def measured_wrk(server: harness.Server, duration: float, **run) -> dict:
    """One measured wrk run, with the CPU the server's workers spent on it."""
    pids = sorted(server.worker_pids())
    before = {pid: harness.cpu_seconds(pid) for pid in pids}
    result = harness.wrk(duration=duration, **run)
    try:
        after = {pid: harness.cpu_seconds(pid) for pid in pids}
    except OSError:  # a worker went away: no honest number
        after = None
    if after is None or sorted(server.worker_pids()) != pids:
        result["worker_cpu_s"] = result["cpu_us_per_request"] = None
    else:
        result["worker_cpu_s"] = sum(after[pid] - before[pid] for pid in pids)
        result["cpu_us_per_request"] = result["worker_cpu_s"] / result["requests"] * 1e6 if result["requests"] else None
    return result


def run_all(
    args: argparse.Namespace, services: harness.Services, servers: dict[str, harness.Server], mode: Mode
) -> list[dict]:
    scenarios = []
    for scenario in args.scenario_list:
        connections = scenario.quick_connections if args.quick else scenario.connections
        rounds = mode.rounds(scenario, args.quick)
        chosen = {key: server for key, server in servers.items() if key in scenario.servers}
        if not chosen:
            continue
        runs: dict[str, list[dict]] = {key: [] for key in chosen}
        for round_ in range(rounds):
            if scenario.fresh_servers and round_ > 0:
                restart(services, servers, list(chosen), mode)
                chosen = {key: servers[key] for key in chosen}
            # Every other round in reverse order: neither server always runs first.
            order = list(chosen.items()) if round_ % 2 == 0 else list(reversed(chosen.items()))
            for key, server in order:
                run = dict(
                    url=server.url + scenario.path,
                    connections=connections,
                    threads=mode.wrk_threads,
                    headers=scenario.headers,
                    post_bytes=scenario.post_bytes,
                    cpus=mode.load_cpus,
                )
                if args.warmup and (round_ == 0 or scenario.fresh_servers):
                    # Same load, unmeasured: upstream pools and caches reach this scenario's size.
                    harness.wrk(duration=args.warmup, **run)
                log(
                    f"{mode.title}, {scenario.key}: {SERVERS[key]}, {connections} conns, {args.duration} s, "
                    f"round {round_ + 1}/{rounds}"
                )
                runs[key].append(measured_wrk(server, args.duration, **run))
                time.sleep(0.5)
        results = {key: median_result(server_runs) for key, server_runs in runs.items()}
        entry = {**asdict(scenario), "rounds": rounds, "connections": connections, "results": results}
        if "proxy_cache" in chosen:
            entry["proxy_cache_rss_bytes"] = sum(harness.rss_bytes(p) for p in chosen["proxy_cache"].worker_pids())
        scenarios.append(entry)
    return scenarios


def run_stampede(services: harness.Services, mode: Mode) -> dict:
    """One expired 1 MiB object, ``STAMPEDE_CLIENTS`` requests at once through
    a caching proxy: the origin's request count and the time to the last byte."""
    origin = services.counting_origin(cpus=mode.load_cpus)
    proxy = services.proxy(
        origin, workers=mode.proxy_workers, cpus=mode.proxy_cpus, name="proxy-stampede", cache=True, next_hop=origin
    )
    harness.http_get(proxy.port, "/object")  # stored with max-age=1
    time.sleep(1.5)  # now expired
    before = int(harness.http_get(origin.port, "/count")[1])
    log(f"{mode.title}, stampede: {STAMPEDE_CLIENTS} clients at once for one expired 1 MiB object")
    result = harness.stampede(proxy.port, "/object", STAMPEDE_CLIENTS, MIB)
    result["origin_requests"] = int(harness.http_get(origin.port, "/count")[1]) - before
    services.stop(proxy)
    services.stop(origin)
    return result


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def median_result(runs: list[dict]) -> dict:
    """One result from several runs of the same load: the median of each
    number, errors summed; every run is kept under ``runs``."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for field in ("rps", "mb_per_s_down", "mb_per_s_up", "worker_cpu_s", "cpu_us_per_request"):
        out[field] = _median([r[field] for r in runs])
    out["latency_us"] = {name: statistics.median(r["latency_us"][name] for r in runs) for name in runs[0]["latency_us"]}
    out["errors_total"] = sum(r["errors_total"] for r in runs)
    out["runs"] = runs
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _lookup(scenarios: list[dict]):
    """``value(scenario, server, field)`` over one mode's results (``p99``: the latency)."""
    by_key = {s["key"]: s["results"] for s in scenarios}

    def value(scenario: str, server: str, field: str) -> float | None:
        result = by_key.get(scenario, {}).get(server)
        if result is None:
            return None
        return result["latency_us"]["p99"] if field == "p99" else result[field]

    return value


def compute_per_core_targets(scenarios: list[dict]) -> list[Target]:
    value = _lookup(scenarios)

    def vs(scenario: str, other: str, field: str) -> float | None:
        return _ratio(value(scenario, "proxy", field), value(scenario, other, field))

    def cpu(scenario: str) -> float | None:
        return value(scenario, "proxy", "cpu_us_per_request")

    def paired(scenario: str, other: str, field: str) -> float | None:
        """The median of each round's ratio: drift of the machine between rounds cancels out."""
        results = next((s["results"] for s in scenarios if s["key"] == scenario), {})
        if "proxy" not in results or other not in results:
            return None
        ours, theirs = results["proxy"].get("runs", [results["proxy"]]), results[other].get("runs", [results[other]])
        ratios = [r for a, b in zip(ours, theirs, strict=True) if (r := _ratio(a[field], b[field])) is not None]
        return statistics.median(ratios) if ratios else None

    return [
        Target(
            "per_core_rps_vs_node",
            "1 KiB keep-alive req/s: proxy / Node http-proxy",
            vs("1k_keepalive", "node", "rps"),
            0.6,
            "ge",
            moonshot=0.75,
            proxy_cpu_us_per_request=cpu("1k_keepalive"),
        ),
        Target(
            "per_core_p99_vs_node",
            "1 KiB keep-alive p99: proxy / Node http-proxy",
            vs("1k_keepalive", "node", "p99"),
            1.5,
            "le",
            proxy_cpu_us_per_request=cpu("1k_keepalive"),
        ),
        Target(
            "per_core_get_vs_nginx",
            "1 MiB GET MB/s: proxy / nginx proxy (buffering off)",
            vs("1m_download", "nginx", "mb_per_s_down"),
            1.0,
            "ge",
            proxy_cpu_us_per_request=cpu("1m_download"),
        ),
        Target(
            "per_core_post_vs_nginx",
            "1 MiB POST MB/s: proxy / nginx proxy (buffering off)",
            vs("1m_upload", "nginx", "mb_per_s_up"),
            1.0,
            "ge",
            proxy_cpu_us_per_request=cpu("1m_upload"),
        ),
        Target(
            "per_core_new_conn_vs_node",
            "1 KiB new connection per request: proxy / Node",
            vs("1k_new_conn", "node", "rps"),
            1.0,
            "ge",
            proxy_cpu_us_per_request=cpu("1k_new_conn"),
        ),
        Target(
            "per_core_metrics_on_vs_off",
            "1 KiB keep-alive req/s: metrics on / off (median of the rounds' ratios)",
            paired("1k_metrics", "proxy_metrics_off", "rps"),
            0.95,
            "ge",
            proxy_cpu_us_per_request=cpu("1k_metrics"),
        ),
    ]


def cache_targets(scenarios: list[dict], stampede: dict | None) -> list[Target]:
    """The cache's targets (issue 16), per core."""
    value = _lookup(scenarios)
    rss = [s["proxy_cache_rss_bytes"] for s in scenarios if "proxy_cache_rss_bytes" in s]
    origin_requests = None
    if stampede is not None:
        whole = stampede["complete"] == stampede["clients"]
        origin_requests = float(stampede["origin_requests"]) if whole else float("inf")
    return [
        Target(
            "per_core_cache_1k_hits_vs_pass_through",
            "1 KiB cache hits req/s: proxy cache / proxy pass-through",
            _ratio(value("1k_cache_hits", "proxy_cache", "rps"), value("1k_cache_hits", "proxy", "rps")),
            1.5,
            "ge",
            proxy_cpu_us_per_request=value("1k_cache_hits", "proxy_cache", "cpu_us_per_request"),
        ),
        Target(
            "per_core_cache_1m_hits_vs_nginx",
            "1 MiB cache hits MB/s: proxy cache / nginx proxy_cache",
            _ratio(
                value("1m_cache_hits", "proxy_cache", "mb_per_s_down"),
                value("1m_cache_hits", "nginx_cache", "mb_per_s_down"),
            ),
            0.6,
            "ge",
            moonshot=1.0,
        ),
        Target(
            "per_core_cache_stampede_origin_requests",
            f"stampede: origin requests for {STAMPEDE_CLIENTS} clients (inf: a body incomplete)",
            origin_requests,
            1,
            "le",
        ),
        Target(
            "per_core_cache_rss_growth",
            "proxy cache worker RSS growth over the hit scenarios (MiB)",
            (max(rss) - min(rss)) / MIB if len(rss) > 1 else None,
            RSS_GROWTH_LIMIT / MIB,
            "le",
        ),
    ]


def compute_targets(scenarios: list[dict]) -> list[Target]:
    value = _lookup(scenarios)
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
        f"{'errors':>7} {'x proxy':>8} {'p99 x proxy':>11} {'CPU µs/req':>10}"
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
            cpu = r.get("cpu_us_per_request")
            lines.append(
                f"{title:<42} {SERVERS[key]:<18} {r['rps']:>9.0f} {mb:>8.1f} "
                f"{r['latency_us']['p50'] / 1000:>8.2f} {r['latency_us']['p99'] / 1000:>8.2f} "
                f"{r['errors_total']:>7} {'-' if ratio is None else f'{ratio:.2f}':>8} "
                f"{'-' if p99_ratio is None else f'{p99_ratio:.2f}':>11} "
                f"{'-' if cpu is None else f'{cpu:.0f}':>10}"
            )
        lines.append("")
    return "\n".join(lines)


def draw_chart(section: dict, meta: dict, path: Path) -> None:
    """One mode's bar charts; ``section`` is that mode's part of the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = section["scenarios"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    colours = {
        "proxy": "#d62728",
        "node": "#2ca02c",
        "wsgiproxy2": "#9467bd",
        "nginx": "#1f77b4",
        "origin": "#7f7f7f",
        "proxy_cache": "#ff7f0e",
        "nginx_cache": "#17becf",
        "proxy_metrics_off": "#e377c2",
    }
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
    fig.suptitle(
        f"edge proxy benchmark {meta['date']}, {section['settings']['title']} "
        f"({meta['versions']['cpus']} CPUs, {meta['duration_s']} s per run"
        f"{', QUICK SMOKE RUN: numbers meaningless' if meta['quick'] else ''})",
        fontsize=12,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_mode(args: argparse.Namespace, mode: Mode) -> tuple[dict, list[Target]]:
    """Start the servers for ``mode``, measure every scenario, stop them:
    that mode's part of the JSON, and its targets."""
    services = harness.Services(args.proxy_python)
    try:
        servers = start_servers(services, args, mode)
        at_start = pinning(services, mode)
        scenarios = run_all(args, services, servers, mode)
        at_end = pinning(services, mode)  # workers still the pinned ones
        stampede = run_stampede(services, mode) if "proxy_cache" in servers else None
        access_lines = None
        if "proxy" in servers:
            access_log = services.tmp / "proxy" / "log" / "access.log"
            access_lines = sum(1 for _ in access_log.open("rb")) if access_log.exists() else 0
    finally:
        services.cleanup(keep=args.keep_scratch)
    wrk_cpus = sorted({r["wrk_cpus_allowed"] for s in scenarios for r in all_runs(s) if "wrk_cpus_allowed" in r})
    targets = compute_per_core_targets(scenarios) if mode.pinned else compute_targets(scenarios)
    if mode.pinned:
        targets += cache_targets(scenarios, stampede)
    section = {
        "stampede": stampede,
        "settings": {
            "title": mode.title,
            "proxy_workers": mode.proxy_workers,
            "wsgiproxy2_workers": mode.proxy_workers,
            "origin_workers": mode.origin_workers,
            "wrk_threads": mode.wrk_threads,
            "nginx_proxy_buffering": "on" if mode.nginx_response_buffering else "off",
            "proxy_cpus": None if mode.proxy_cpus is None else harness.format_cpu_list(mode.proxy_cpus),
            "load_cpus": None if mode.load_cpus is None else harness.format_cpu_list(mode.load_cpus),
        },
        "pinning": {"at_start": at_start, "at_end": at_end, "wrk_cpus_allowed": wrk_cpus},
        "proxy_access_log_lines": access_lines,
        "scenarios": scenarios,
        "targets": [t.as_dict() for t in targets],
    }
    return section, targets


def all_runs(scenario: dict) -> list[dict]:
    return [run for result in scenario["results"].values() for run in result.get("runs", [result])]


def format_pinning(section: dict) -> str:
    """Which CPU each process got, as /proc/PID/status said during the run."""
    lines = ["Pinning (Cpus_allowed_list from /proc/PID/status, read after start-up and after the last run):"]
    for key, processes in section["pinning"]["at_end"].items():
        listed = ", ".join(f"{p['process']} {p['pid']}: CPU {p['cpus_allowed']}" for p in processes)
        lines.append(f"  {SERVERS.get(key, key):<18} {listed}")
    wrk_cpus = ", ".join(section["pinning"]["wrk_cpus_allowed"]) or "?"
    lines.append(f"  {'wrk -t1':<18} CPU {wrk_cpus} (every run)")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def print_section(section: dict, targets: list[Target], meta: dict, args: argparse.Namespace) -> None:
    settings = section["settings"]
    print()
    print(
        f"== {settings['title']}: {meta['duration_s']} s per run, proxy and WSGIProxy2 with "
        f"{_count(settings['proxy_workers'], 'worker')}, Node 1 process, nginx proxy 1 worker (proxy_buffering "
        f"{settings['nginx_proxy_buffering']}), origin {_count(settings['origin_workers'], 'worker')}, "
        f"wrk -t{settings['wrk_threads']}" + ("  [QUICK SMOKE RUN: numbers are meaningless]" if args.quick else "")
    )
    if settings["proxy_cpus"] is not None:
        print(f"proxies pinned to CPU {settings['proxy_cpus']}; wrk and the origin to CPU {settings['load_cpus']}")
        print(format_pinning(section))
    print("x proxy = this row's req/s (MB/s for the 1 MiB rows) / the proxy's; p99 x proxy likewise for p99")
    print("CPU µs/req = the workers' utime+stime during the measured run / the requests wrk completed")
    print("rows of scenarios run in several rounds show the median of each number\n")
    print(format_table(section["scenarios"]))
    print(f"Targets ({settings['title']}, ratios measured in this run):")
    for target in targets:
        print(target_line(target))
    if section["proxy_access_log_lines"] is not None:
        print(f"\nproxy access log: {section['proxy_access_log_lines']} lines written during the run")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.no_install:
        harness.install_everything(args.proxy_python)
    harness.reexec_in_bench_venv()
    harness.raise_nofile()
    started_at = time.time()
    layout = harness.per_core_layout()
    modes: list[Mode] = []
    skipped = None
    if args.mode in ("per-core", "both"):
        if layout is None:
            skipped = f"per-core mode needs 2 CPUs, this process may use {harness.cpus()}: skipped"
            log(skipped)
        else:
            modes.append(per_core_mode(layout))
    if args.mode in ("all-cores", "both"):
        modes.append(all_cores_mode(args))
    measured = {mode.key: run_mode(args, mode) for mode in modes}

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at)),
        "elapsed_s": round(time.time() - started_at, 1),
        "mode": args.mode,
        "quick": args.quick,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "machine": harness.machine(),
        "per_core_skipped": skipped,
        "smt_siblings": layout.smt_siblings if layout else None,
        "versions": harness.versions(args.proxy_python),
    }
    data = {"meta": meta, **{key: section for key, (section, _) in measured.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    charts = []
    for key, section in data.items():
        if key != "meta":
            charts.append(args.out.with_name(f"{args.out.stem}-{key.replace('_', '-')}.png"))
            draw_chart(section, meta, charts[-1])

    machine = meta["machine"]
    print()
    print(
        f"edge proxy benchmark, {meta['date']}, mode {args.mode}: {machine['cpu_model']}, {machine['kernel']}, "
        f"{machine['cpus_online']} CPUs online (this run may use {machine['cpus_allowed']})"
    )
    print(f"the proxy's Python: {meta['versions']['proxy_python']} (the image runs {harness.SHIPPED_PYTHON})")
    if skipped:
        print(skipped)
    elif layout is not None and layout.smt_siblings and "per_core" in measured:
        print("note: the two per-core CPUs are hyper-threads of one physical core")
    for section, targets in measured.values():
        print_section(section, targets, meta, args)
    print(f"\nresults: {args.out}\ncharts:  {', '.join(str(c) for c in charts) or 'none'}")
    # The response reader against h11, in-process (docs/architecture.md):
    # a ratio within one interpreter, run by the dev venv, which has h11.
    dev_python = harness.ROOT / ".venv" / "bin" / "python"
    if dev_python.exists():
        reader_compare = [str(dev_python), str(Path(__file__).with_name("reader_compare.py"))]
        subprocess.run(reader_compare + (["--quick"] if args.quick else []), check=False)
    else:
        log(f"reader comparison skipped: {dev_python} is missing (`make bench` makes it)")
    if args.check and any(t.passed is False for _, targets in measured.values() for t in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
