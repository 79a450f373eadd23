#!/usr/bin/env bash
# Make sure a Docker engine answers on this host: install Debian's docker.io and start dockerd
# in the background when none is running. The enclave never needs container networking, so the
# engine we start has no bridge and touches no iptables.
set -euo pipefail

# Site hardening: io_uring bypasses seccomp's view of system calls, and engines before 25 let
# containers set up a ring; turn it off for unprivileged processes where the kernel has it.
if [ "$(id -u)" = 0 ] && [ -w /proc/sys/kernel/io_uring_disabled ]; then
  echo 2 > /proc/sys/kernel/io_uring_disabled || true
fi
if docker info >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-docker: no Docker engine answers and this user is not root; start dockerd first" >&2
  exit 1
fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "ensure-docker: installing Debian's docker.io" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker.io >/dev/null
fi
log=/var/log/sealroom-dockerd.log
echo "ensure-docker: starting dockerd (log: $log)" >&2
setsid dockerd --bridge=none --iptables=false --ip6tables=false >"$log" 2>&1 < /dev/null &
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "ensure-docker: dockerd did not answer within 60 s; last lines of $log:" >&2
tail -n 20 "$log" >&2
exit 1
