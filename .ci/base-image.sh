#!/usr/bin/env bash
# Make this machine able to build and run the proxy's image with podman, and
# provide the base image `debian:bookworm-slim` without any registry: it is
# built from Debian's packages with debootstrap and imported into podman.
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

BASE_IMAGE=docker.io/library/debian:bookworm-slim

# -- tools ------------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "base-image: installing ${missing[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends podman runc debootstrap \
        uidmap fuse-overlayfs containernetworking-plugins iptables catatonit >/dev/null
fi

# -- engine configuration -------------------------------------------------------------
# runc and cgroupfs: this machine runs no systemd and has a hybrid cgroup tree.
# default_ulimits = []: podman would otherwise set RLIMIT_NOFILE to 1048576
# in every container, which needs CAP_SYS_RESOURCE, absent in this sandbox.
mkdir -p /etc/containers
conf=/etc/containers/containers.conf
want='# Written by .ci/base-image.sh
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
'
if [[ ! -f $conf ]] || [[ "$(cat "$conf")" != "$(printf '%s' "$want")" ]]; then
    printf '%s' "$want" >"$conf"
fi

# -- base image -------------------------------------------------------------------------
# Stored under its full name, so `FROM debian:bookworm-slim` finds it locally
# (builds use --pull=never: no registry is ever asked).
if podman image exists "$BASE_IMAGE"; then
    exit 0
fi
echo "base-image: building $BASE_IMAGE with debootstrap" >&2
root=$(mktemp -d /var/tmp/bookworm-slim.XXXXXX)
# --one-file-system: never descend into a /proc or /sys that a failed
# debootstrap left mounted inside the tree.
trap 'rm -rf --one-file-system "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" >"$root.log" 2>&1 || {
    tail -40 "$root.log" >&2
    rm -f "$root.log"
    exit 1
}
rm -f "$root.log"
# Like the published image: the point-release, updates and security suites
# (from the mirror debootstrap used, named nowhere here); dpkg leaves out
# documentation, man pages and translations, apt keeps no package files;
# no apt lists, caches, docs or man pages in the image.
sources="$root/etc/apt/sources.list"
mirror=$(awk '$1 == "deb" { print $2; exit }' "$sources")
if [[ -n $mirror ]]; then
    printf 'deb %s bookworm-updates main\n' "$mirror" >>"$sources"
    if [[ $mirror == */debian ]]; then
        printf 'deb %s-security bookworm-security main\n' "$mirror" >>"$sources"
    fi
fi
cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
cat >"$root/etc/apt/apt.conf.d/slim" <<'CFG'
APT::Install-Recommends "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
CFG
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/groff/* "$root"/usr/share/lintian/* \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
tar -C "$root" --numeric-owner -c . | podman import --quiet \
    --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$BASE_IMAGE" >/dev/null
podman image exists "$BASE_IMAGE"
echo "base-image: $BASE_IMAGE imported" >&2
