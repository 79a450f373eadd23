#!/usr/bin/env bash
# Make sure a Slurm cluster answers on this host, for the Slurm runtime's tests: Debian's munge
# and slurm-wlm, one slurmctld and two slurmd nodes. node-a runs in the host's network; node-b
# runs in its own network namespace (sealroom-node-b, reached over a veth pair), so the two
# daemons listen on the same port at two addresses, as two machines would. Idempotent: a
# cluster that already answers with both nodes up is left as it is.
#
# The munge key is generated here (never committed); slurm.conf is this project's, written to
# /etc/slurm. Logs: /var/log/slurm/. Both nodes carry a feature of their own name (node-a,
# node-b) and the feature "enclave".
set -euo pipefail

NS=sealroom-node-b
HOST_IP=10.213.0.1
NODE_B_IP=10.213.0.2

up() {
  [ -s /etc/slurm/oci.conf ] && sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|mix|alloc)/ {n++} END {exit n != 2}'
}

if up; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-slurm: no Slurm cluster answers and this user is not root" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  echo "ensure-slurm: installing Debian's munge and slurm-wlm" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq munge slurm-wlm >/dev/null
fi
command -v runc >/dev/null 2>&1 || {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq runc >/dev/null
}

# munge: a key of this host's own, then the daemon.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 20); do munge -n >/dev/null 2>&1 && break; sleep 0.25; done
fi

# node-b's network namespace and the veth pair between it and the host.
if ! ip netns list | grep -qw "$NS"; then
  ip netns add "$NS"
fi
if ! ip link show sr-host >/dev/null 2>&1; then
  ip link add sr-host type veth peer name sr-node-b
  ip link set sr-node-b netns "$NS"
  ip addr add "$HOST_IP/30" dev sr-host
  ip link set sr-host up
  ip netns exec "$NS" ip addr add "$NODE_B_IP/30" dev sr-node-b
  ip netns exec "$NS" ip link set sr-node-b up
  ip netns exec "$NS" ip link set lo up
fi

cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
install -d -m 0755 /etc/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd
cat > /etc/slurm/slurm.conf <<EOF
# Written by sealroom's enclave/image/ensure-slurm.sh: a test cluster on one host.
ClusterName=sealroom
SlurmctldHost=localhost($HOST_IP)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmdTimeout=30
Waittime=0
NodeName=node-a NodeAddr=$HOST_IP CPUs=$cpus RealMemory=$mem_mb Feature=node-a,enclave State=UNKNOWN
NodeName=node-b NodeAddr=$NODE_B_IP CPUs=$cpus RealMemory=$mem_mb Feature=node-b,enclave State=UNKNOWN
PartitionName=enclave Nodes=node-a,node-b Default=YES MaxTime=60 State=UP OverSubscribe=NO
EOF
install -d -m 0755 /var/spool/slurmd/node-a /var/spool/slurmd/node-b
# srun --container=BUNDLE starts the bundle with runc (Debian's crun 1.8 fails on this host's
# hybrid cgroups); the bundle's config.json carries the isolation (enclave/runtime/_oci.py).
cat > /etc/slurm/oci.conf <<'EOF'
RunTimeQuery="runc --root=/run/sealroom-runc state %n.%u.%j.%s.%t"
RunTimeKill="runc --root=/run/sealroom-runc kill -a %n.%u.%j.%s.%t SIGKILL"
RunTimeDelete="runc --root=/run/sealroom-runc delete --force %n.%u.%j.%s.%t"
RunTimeRun="runc --root=/run/sealroom-runc run %n.%u.%j.%s.%t -b %b"
EOF

if ! scontrol ping 2>/dev/null | grep -q UP; then
  setsid /usr/sbin/slurmctld -i </dev/null >/dev/null 2>&1 &
  for _ in $(seq 1 40); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.25; done
fi
if [ ! -e /run/slurmd-node-a.pid ] || ! kill -0 "$(cat /run/slurmd-node-a.pid)" 2>/dev/null; then
  setsid /usr/sbin/slurmd -N node-a </dev/null >/dev/null 2>&1 &
fi
if [ ! -e /run/slurmd-node-b.pid ] || ! kill -0 "$(cat /run/slurmd-node-b.pid)" 2>/dev/null; then
  # nsenter, not `ip netns exec`: only the network namespace, so the host's /sys/fs/cgroup stays
  setsid nsenter --net=/run/netns/"$NS" /usr/sbin/slurmd -N node-b </dev/null >/dev/null 2>&1 &
fi
for _ in $(seq 1 60); do
  if up; then
    exit 0
  fi
  sleep 0.5
done
echo "ensure-slurm: the cluster did not come up within 30 s; sinfo and the last log lines:" >&2
sinfo -N >&2 || true
tail -n 15 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-node-*.log >&2 || true
exit 1
