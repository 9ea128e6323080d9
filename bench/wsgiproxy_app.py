"""WSGIProxy2 in front of the origin, for comparison (run by wsgiproxy_conf.py).

Its urllib3 client with one keep-alive pool per worker, as the proxy under
test has; WSGIProxy2's default client opens a new connection per request.
"""

import os

import urllib3
from wsgiproxy import HostProxy

_pool = urllib3.PoolManager(num_pools=4, maxsize=int(os.environ.get("BENCH_WORKER_CONNECTIONS", "10000")))
app = HostProxy(f"http://{os.environ['BENCH_NEXT_HOP']}", client="urllib3", pool=_pool)
