#!/usr/bin/env bash
# Makes sure Slurm (slurm-wlm 22.05+) and munge are installed for the real-Slurm tests (tests/slurm), with apt-get
# when they are missing; silent when they are there. Never fails: without them (no apt-get, not root, no network) it
# says so in one line and the real-Slurm tests then fail, naming what to install.
set -u
PATH=$PATH:/usr/sbin:/sbin
missing=()
for prog in munged mungekey slurmctld slurmd sbatch srun scontrol sinfo squeue scancel; do
    command -v "$prog" >/dev/null 2>&1 || missing+=("$prog")
done
((${#missing[@]} == 0)) && exit 0

echo "tests/slurm: ${missing[*]} missing: installing slurm-wlm and munge with apt-get" >&2
sudo=()
((EUID == 0)) || sudo=(sudo -n)
if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    # The package lists are refreshed only when the first try fails (a fresh machine has none).
    if ! "${sudo[@]}" apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; then
        "${sudo[@]}" apt-get update -q >/dev/null 2>&1 || true
        "${sudo[@]}" apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || true
    fi
fi
for prog in "${missing[@]}"; do
    if ! command -v "$prog" >/dev/null 2>&1; then
        echo "tests/slurm: could not install slurm-wlm and munge (apt-get missing, failed, or not root):" \
            "the real-Slurm tests will fail saying Slurm is missing" >&2
        exit 0
    fi
done
# Just installed: where systemd runs, the packages' own slurmctld/slurmd may hold the ports the tests' daemons use.
for svc in slurmctld slurmd; do
    "${sudo[@]}" systemctl stop "$svc" >/dev/null 2>&1 || true
done
exit 0
