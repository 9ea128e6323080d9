#!/usr/bin/env bash
# CI stage for the container image (docs/container.md): podman and the base
# image (.ci/base-image.sh), the wheelhouse downloaded on the host, an
# offline build of the image, then tests/container/ against it for real.
# Uses .venv (made by `make test`, which .ci/run runs first; made here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${PROXY_IMAGE:-localhost/edge-proxy:ci}
WHEELS=build/wheels   # gitignored; the Dockerfile's offline mode reads it
started=$SECONDS
stage() { printf 'container: %s (%ds)\n' "$*" $((SECONDS - started)) >&2; }

stage "podman and the base image"
bash .ci/base-image.sh

# Wheels for the image's interpreter (Debian bookworm: CPython 3.11, glibc
# 2.36, x86_64), whatever Python this host runs. pip does not widen a
# manylinux_2_N platform to older N, so every compatible tag is listed.
stage "wheelhouse in $WHEELS"
platforms=()
for minor in $(seq 36 -1 17); do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
platforms+=(--platform manylinux2014_x86_64 --platform linux_x86_64)
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
[[ -x .venv/bin/python ]] || make --no-print-directory .venv/.installed
.venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r requirements-lock.txt -d "$WHEELS" --only-binary=:all: "${platforms[@]}" \
    --python-version 3.11 --implementation cp --abi cp311 2> >(grep -v 'is ignored: it is neither' >&2)

stage "building $IMAGE"
podman build --network host --pull=never --format docker --build-arg "WHEELS=$WHEELS" \
    --tag "$IMAGE" . >build/image-build.log 2>&1 || {
    tail -60 build/image-build.log >&2
    exit 1
}
podman image prune --force >/dev/null
stage "image $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.1f MB", $1 / 1e6 }')"

stage "tests/container"
PROXY_IMAGE=$IMAGE .venv/bin/python -m pytest tests/container -p no:cacheprovider
stage "done"
