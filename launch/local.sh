#!/usr/bin/env bash
# Train on this machine with N ranks under the deepspeed launcher (CPU or GPU).
#
# Usage: launch/local.sh CONFIG [DS_JSON] [key=value ...]
#   NEUROPRUNE_NPROC   ranks to start                                   [2]
#   MASTER_PORT        rendezvous port                                  [a free port]
#   (and the knobs of launch/_common.sh: NEUROPRUNE_ENTRY, NEUROPRUNE_PYTHON, OMP_NUM_THREADS, ...)
# Example: launch/local.sh run.yaml ds_configs/zero2_bf16.json schedule.max_steps=20
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_common.sh"

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ ${1:-} == -h || ${1:-} == --help ]] && usage
parse_entry_args "$@" || usage

NPROC=${NEUROPRUNE_NPROC:-2}
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NEUROPRUNE_NPROC must be a positive integer (got '$NPROC')"
setup_rank_env "$NPROC"
MASTER_PORT=${MASTER_PORT:-$(free_port)}

# '--include localhost:0,1' fails on CPU ("No slot '1'"); a hostfile with 'localhost slots=N' works, and
# with a single host the launcher needs neither ssh nor a guessed address.
HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/neuroprune-hostfile.XXXXXX")
trap 'rm -f "$HOSTFILE"' EXIT
echo "localhost slots=$NPROC" >"$HOSTFILE"

# --no_local_rank: LOCAL_RANK is in the environment; the entry point need not parse --local_rank.
# Not exec: the trap must remove the hostfile afterwards.
"$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh_check \
  --master_addr 127.0.0.1 --master_port "$MASTER_PORT" --no_local_rank \
  --module "$ENTRY" "${ENTRY_ARGS[@]}"
