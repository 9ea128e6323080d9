"""Gunicorn configuration: ``gunicorn -c gunicorn.conf.py`` starts the proxy.

Gunicorn runs this file in the master at start-up and again on every SIGHUP
reload. Deployment settings come from the environment (``proxy.settings``);
the user's ``proxy.toml`` is parsed here, in the master, and workers inherit
the parsed object through fork. A reload whose configuration is invalid
keeps the previous one: nothing is ever half-applied.
"""

import os
import resource
import sys

# gevent's default resolver runs getaddrinfo() in a thread: /etc/hosts first,
# then /etc/resolv.conf, as the platform contract requires. Set explicitly so
# an inherited GEVENT_RESOLVER (ares ignores /etc/hosts) cannot change that.
os.environ["GEVENT_RESOLVER"] = "thread"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from proxy import balance, cache_store, internals, metrics_server  # noqa: E402
from proxy import config as proxy_config  # noqa: E402
from proxy import metrics as proxy_metrics  # noqa: E402
from proxy import settings as proxy_settings  # noqa: E402
from proxy.logs import error_log, logging_config  # noqa: E402

_settings = proxy_settings.from_environ()

wsgi_app = "proxy.app:create_app()"
worker_class = "proxy.worker.ProxyWorker"
bind = [f"0.0.0.0:{_settings.port}"]
workers = _settings.workers
worker_connections = proxy_settings.WORKER_CONNECTIONS
backlog = proxy_settings.BACKLOG
keepalive = _settings.keepalive_timeout
graceful_timeout = _settings.graceful_timeout
timeout = _settings.worker_timeout
pidfile = str(_settings.pidfile)
proc_name = "edge-proxy"

# Plain HTTP/1.1 only, the pure-Python parser (its request-smuggling
# defences are the ones our hostile-input tests prove), any method token.
http_protocols = "h1"
http_parser = "python"
permit_unconventional_http_method = True
control_socket_disable = True
# No header rewrites the WSGI environment (REMOTE_ADDR, wsgi.url_scheme):
# the proxy reads X-Forwarded-* itself. With nothing left to trust a peer
# for, every peer is "trusted", which spares an address parse per request.
forwarder_headers = ""
secure_scheme_headers = {}
forwarded_allow_ips = "*"
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190

accesslog = None
logger_class = "proxy.logs.ProxyGunicornLogger"
errorlog = str(_settings.error_log) if _settings.log_target == "file" else "-"
capture_output = _settings.log_target == "file"
logconfig_dict = logging_config(_settings)


def _prepare_directories() -> None:
    if _settings.log_target == "file":
        _settings.log_dir.mkdir(parents=True, exist_ok=True)
    _settings.run_dir.mkdir(parents=True, exist_ok=True)


def _raise_open_files_limit() -> None:
    """Each client connection and each upstream connection is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


_prepare_directories()
_raise_open_files_limit()


def _prepare_cache(config: proxy_config.ProxyConfig, startup: bool) -> None:
    """Create PROXY_CACHE_DIR and its index, apply the size limit (raises
    CacheDirError). Only with ``[cache] enabled``; the master closes the
    index again before forking."""
    if config.cache.enabled:
        cache_store.prepare(_settings.cache_dir, config.cache, sweep=startup)


def on_starting(server) -> None:
    """Refuse to start, saying why (on stderr whatever the log target, see
    proxy.logs), if a library's private parts the proxy relies on changed,
    the configuration is invalid or the cache directory unusable; then make
    the table the workers share (before the first fork)."""
    try:
        internals.check(internals.BEFORE_PATCHING)
    except internals.InternalsError as exc:
        error_log.error("not starting: %s", exc)
        raise SystemExit(1) from None
    try:
        proxy_config.active = proxy_config.load(_settings.config_dir)
        _prepare_cache(proxy_config.active, startup=True)
    except proxy_config.ConfigError as exc:
        error_log.error("invalid configuration, not starting: %s", "; ".join(map(str, exc.problems)))
        raise SystemExit(1) from None
    except cache_store.CacheDirError as exc:
        error_log.error("PROXY_CACHE_DIR=%s unusable, not starting: %s", _settings.cache_dir, exc)
        raise SystemExit(1) from None
    balance.create_table()
    proxy_metrics.prepare(_settings)


def _enabled_cache_dir():
    """Where the cache is while the active configuration enables it (read at each scrape)."""
    return _settings.cache_dir if proxy_config.active is not None and proxy_config.active.cache.enabled else None


def when_ready(server) -> None:
    """The Prometheus endpoint on loopback, served by this master (proxy.metrics_server)."""
    if _settings.metrics_port is not None:
        metrics_server.serve(_settings.metrics_port, _settings.metrics_dir, _enabled_cache_dir)


def on_exit(server) -> None:
    metrics_server.stop()


def on_reload(server) -> None:
    """Apply the new configuration to the next generation of workers, or keep
    the current one if the new one is invalid."""
    try:
        config = proxy_config.load(_settings.config_dir)
        _prepare_cache(config, startup=False)
    except proxy_config.ConfigError as exc:
        error_log.error("reload: invalid configuration, keeping the previous one: %s", exc)
        proxy_metrics.reloaded(ok=False)
    except cache_store.CacheDirError as exc:
        error_log.error(
            "reload: PROXY_CACHE_DIR=%s unusable, keeping the previous configuration: %s", _settings.cache_dir, exc
        )
        proxy_metrics.reloaded(ok=False)
    else:
        proxy_config.active = config
        error_log.info("reload: configuration applied from %s", _settings.config_dir)
        proxy_metrics.reloaded(ok=True)


def pre_fork(server, worker) -> None:
    """A slot in the table that spreads connections over workers (proxy.balance)."""
    worker.balance_slot = balance.assign(server.WORKERS.values())


def post_worker_init(worker) -> None:
    proxy_metrics.start_worker(lambda: worker.share.open)


def worker_exit(server, worker) -> None:
    """In the exiting worker: its last counts reach its metric files."""
    proxy_metrics.flush()


def child_exit(server, worker) -> None:
    balance.release(getattr(worker, "balance_slot", None))
    proxy_metrics.worker_exited(worker.pid)
