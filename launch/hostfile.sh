#!/usr/bin/env bash
# Train on several machines listed in an MPI-style hostfile ("host slots=N" per line) with the deepspeed
# launcher. By default it runs once, on the first host, and reaches the others over ssh (pdsh).
#
# Usage: launch/hostfile.sh HOSTFILE CONFIG [DS_JSON] [key=value ...]
#   MASTER_ADDR           address of the first host, reachable from all  [first host in HOSTFILE]
#   MASTER_PORT           rendezvous port                                [29500]
#   NEUROPRUNE_NODE_RANK  set it to run WITHOUT ssh: start this script on every host yourself, each with
#                         its index in HOSTFILE (deepspeed --no_ssh --node_rank)
#   NEUROPRUNE_DS_ARGS    extra deepspeed launcher arguments, e.g. "--launcher openmpi" or "--num_nodes 2"
#   (and the knobs of launch/_common.sh: NEUROPRUNE_ENTRY, NEUROPRUNE_PYTHON, OMP_NUM_THREADS, ...)
# OMP_NUM_THREADS and the torch.distributed variables are also set on every rank by
# neuroprune_ds.distributed (pdsh does not forward the local environment to the other hosts).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_common.sh"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ ${1:-} == -h || ${1:-} == --help || $# -lt 2 ]] && usage
HOSTFILE=$1
shift
[[ -r $HOSTFILE ]] || die "cannot read hostfile '$HOSTFILE'"
parse_entry_args "$@" || usage

# Hosts and slots, skipping comments and blank lines.
mapfile -t HOSTS < <(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}')
((${#HOSTS[@]} > 0)) || die "no hosts in '$HOSTFILE'"
SLOTS=$(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF {for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) {sub("slots=", "", $i); print $i; exit}}')
setup_rank_env "${SLOTS:-1}"
MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
MASTER_PORT=${MASTER_PORT:-29500}

LAUNCHER_ARGS=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank)
if [[ -n ${NEUROPRUNE_NODE_RANK:-} ]]; then
  LAUNCHER_ARGS+=(--no_ssh --node_rank "$NEUROPRUNE_NODE_RANK")
fi
# shellcheck disable=SC2206  # NEUROPRUNE_DS_ARGS is a word list on purpose
LAUNCHER_ARGS+=(${NEUROPRUNE_DS_ARGS:-})

exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCHER_ARGS[@]}" --module "$ENTRY" "${ENTRY_ARGS[@]}"
