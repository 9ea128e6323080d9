#!/bin/sh
# /opt/section/validate.sh: the platform's hook; the logic is proxy/hooks.py.
PROXY_HOME="${PROXY_HOME:-$(cd "$(dirname "$0")/.." && pwd)}"
export PYTHONPATH="$PROXY_HOME${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
exec "${PROXY_PYTHON:-python3}" -m proxy.hooks validate
