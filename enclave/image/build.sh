#!/usr/bin/env bash
# Build the job runtime image locally, in three cached layers:
#   sealroom-base:<hash>     debootstrapped Debian bookworm with python3 and the job user (uid 10001)
#   sealroom-deps:<hash>     + the pinned runtime site-packages (requirements.txt), installed on the host
#   sealroom-runtime:<hash>  + trainers/ ; also tagged sealroom-runtime:latest
# Each tag is a hash of what went into it, so a second run only checks that the tags exist.
# Usage: enclave/image/build.sh PYTHON   (PYTHON: the project venv's interpreter, for pip)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
py=${1:-python3}
work="$top/.image"
mkdir -p "$work"

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

base_tag="sealroom-base:$(echo "bookworm minbase python3 uid10001 v1" | sha256sum | cut -c1-16)"
if ! have "$base_tag"; then
  if [ "$(id -u)" != 0 ]; then echo "build.sh: debootstrap needs root" >&2; exit 1; fi
  command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  rootfs="$work/rootfs"
  rm -rf "$rootfs"
  echo "build.sh: debootstrap bookworm (about a minute)" >&2
  debootstrap --variant=minbase --include=python3 bookworm "$rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  echo 'sealroom:x:10001:10001:sealroom job:/tmp:/usr/sbin/nologin' >>"$rootfs/etc/passwd"
  echo 'sealroom:x:10001:' >>"$rootfs/etc/group"
  # Nothing in the job needs apt, its caches or setuid helpers: strip them.
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
  find "$rootfs" -xdev -perm /6000 -type f -exec chmod ug-s {} +
  mkdir -p "$rootfs"/data "$rootfs"/model/base "$rootfs"/code "$rootfs"/output
  tar -C "$rootfs" -c . | docker import - "$base_tag" >/dev/null
  rm -rf "$rootfs"
fi

deps_tag="sealroom-deps:$(hash_of "$here/requirements.txt" "$here/Dockerfile.deps" <(echo "$base_tag"))"
if ! have "$deps_tag"; then
  ctx="$work/deps-ctx"
  rm -rf "$ctx"; mkdir -p "$ctx"
  echo "build.sh: installing runtime packages for the image" >&2
  "$py" -m pip install -q --no-compile --target "$ctx/site" -r "$here/requirements.txt"
  rm -rf "$ctx/site/bin"
  cp "$here/Dockerfile.deps" "$ctx/Dockerfile"
  docker build -q --network none --build-arg BASE_IMAGE="$base_tag" -t "$deps_tag" "$ctx" >/dev/null
  rm -rf "$ctx"
fi

runtime_hash=$( (cd "$top" && find trainers -name '*.py' -type f | LC_ALL=C sort | xargs cat; cat "$here/Dockerfile"; echo "$deps_tag") | sha256sum | cut -c1-16)
runtime_tag="sealroom-runtime:$runtime_hash"
if ! have "$runtime_tag"; then
  ctx="$work/runtime-ctx"
  rm -rf "$ctx"; mkdir -p "$ctx"
  (cd "$top" && find trainers -name '*.py' -type f -print0 | xargs -0 cp --parents -t "$ctx")
  cp "$here/Dockerfile" "$ctx/Dockerfile"
  docker build -q --network none --build-arg DEPS_IMAGE="$deps_tag" -t "$runtime_tag" "$ctx" >/dev/null
  rm -rf "$ctx"
fi
docker tag "$runtime_tag" sealroom-runtime:latest
# Older runtime tags pile up otherwise; images a container still uses are kept by Docker.
docker images --format '{{.Repository}}:{{.Tag}}' sealroom-runtime \
  | grep -v -e ":latest$" -e "^$runtime_tag$" | xargs -r docker rmi >/dev/null 2>&1 || true
echo "$runtime_tag"
