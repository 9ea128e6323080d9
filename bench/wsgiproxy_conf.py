"""Gunicorn settings for WSGIProxy2: the gevent worker with the same worker
count, worker_connections, keep-alive and backlog as the proxy under test
(run.py passes the proxy's values in the environment)."""

import os

wsgi_app = "wsgiproxy_app:app"
worker_class = "gevent"
bind = [f"127.0.0.1:{os.environ['BENCH_PORT']}"]
workers = int(os.environ["BENCH_WORKERS"])
worker_connections = int(os.environ["BENCH_WORKER_CONNECTIONS"])
keepalive = int(os.environ["BENCH_KEEPALIVE"])
backlog = 4096
timeout = 30
accesslog = None
errorlog = "-"
