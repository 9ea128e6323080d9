# The proxy's container image. Build and run: see docs/container.md.
#
#   podman build --format docker -t edge-proxy .                                (pip reaches the index)
#   podman build --format docker --build-arg WHEELS=build/wheels -t edge-proxy .  (offline wheelhouse)
#
# Two stages: `build` makes a virtual environment from requirements-lock.txt
# (hash-checked); the runtime stage is Debian's python3 and that environment,
# with no compiler, no pip and no pip cache.

# A directory of wheels inside the build context (e.g. `build/wheels`, filled
# by `pip download`, see docs/container.md) for an offline build; empty: online.
ARG WHEELS=

# -- build: the virtual environment -------------------------------------------------
FROM debian:bookworm-slim AS build
ARG WHEELS
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
# The context is bind-mounted for this step only: neither the lock file nor
# the wheelhouse becomes a layer.
RUN --mount=type=bind,target=/context \
    set -eu; \
    if [ -n "$WHEELS" ]; then \
        /opt/venv/bin/pip install --no-index --find-links "/context/$WHEELS" \
            --only-binary=:all: --require-hashes -r /context/requirements-lock.txt; \
    else \
        /opt/venv/bin/pip install --only-binary=:all: --require-hashes -r /context/requirements-lock.txt; \
    fi; \
    /opt/venv/bin/pip uninstall --yes --quiet pip setuptools; \
    find /opt/venv/lib -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} +; \
    /opt/venv/bin/python -c 'import gevent, greenlet, gunicorn, urllib3, pythonjsonlogger, zope.interface, re2, prometheus_client'

# -- runtime --------------------------------------------------------------------------
FROM debian:bookworm-slim
ARG DEBIAN_FRONTEND=noninteractive

# python3: the interpreter the venv was made with. logrotate: for
# /opt/section/logrotate.sh (it depends on a cron; the platform, not cron,
# runs the hook). libcap2-bin only for setcap, purged in the same layer.
#
# Port 80 as a non-root user (docs/container.md, "Port 80"): a private copy
# of setpriv carries the file capability cap_net_bind_service in its
# permitted set only; the entrypoint uses it to put that one capability into
# the ambient set and then execs the command, so gunicorn (master and
# workers) can bind port 80 while staying an ordinary, dumpable process.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 logrotate libcap2-bin \
    && cp /usr/bin/setpriv /usr/local/sbin/setpriv-net-bind \
    && setcap cap_net_bind_service=p /usr/local/sbin/setpriv-net-bind \
    && apt-get purge -y --auto-remove libcap2-bin \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && groupadd --system --gid 10001 edgeproxy \
    && useradd --system --uid 10001 --gid edgeproxy --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin edgeproxy \
    && mkdir -p /opt/proxy_config /opt/section /var/log/proxy /run/proxy /var/cache/proxy \
    && chown edgeproxy:edgeproxy /var/log/proxy /run/proxy /var/cache/proxy

COPY --from=build /opt/venv /opt/venv
COPY gunicorn.conf.py pyproject.toml /app/
COPY proxy/ /app/proxy/
COPY --chmod=0755 hooks/validate.sh hooks/update.sh hooks/logrotate.sh hooks/messagehandler.sh /opt/section/
RUN python3 -m compileall -q /app

# The hooks find the package and the interpreter through PROXY_HOME and
# PROXY_PYTHON; `gunicorn` and `python3` on PATH are the venv's. Logs go to
# stdout/stderr (the default); the older platform sets PROXY_LOG_TARGET=file
# for /var/log/proxy (docs/logging.md).
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PROXY_HOME=/app \
    PROXY_PYTHON=/opt/venv/bin/python \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
USER edgeproxy:edgeproxy
EXPOSE 80
STOPSIGNAL SIGTERM
# Is the listener accepting? (The platform's own health check goes through
# the chain to next-hop; this one only says whether this container is up.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ.get('PORT') or 80)), 4).close()"]
# Raise CAP_NET_BIND_SERVICE into the ambient set when this container may
# have it; otherwise (--cap-drop, no-new-privileges) run the command as is,
# which still works on a PORT of 1024 or more.
ENTRYPOINT ["/bin/sh", "-c", "if setpriv-net-bind --inh-caps +net_bind_service --ambient-caps +net_bind_service true 2>/dev/null; then exec setpriv-net-bind --inh-caps +net_bind_service --ambient-caps +net_bind_service -- \"$@\"; fi; exec \"$@\"", "entrypoint"]
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
