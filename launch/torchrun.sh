#!/usr/bin/env bash
# Train with torchrun: N ranks on this machine, or one torchrun per machine with c10d rendezvous.
#
# Usage: launch/torchrun.sh CONFIG [DS_JSON] [key=value ...]
#   NEUROPRUNE_NPROC      ranks per machine                                 [2]
#   NEUROPRUNE_NNODES     machines; >1 needs NEUROPRUNE_RDZV_ENDPOINT        [1]
#   NEUROPRUNE_RDZV_ENDPOINT  host:port of the rendezvous (any one of the machines)
#   NEUROPRUNE_RDZV_ID    job id shared by all machines of one run           [neuroprune]
#   (and the knobs of launch/_common.sh: NEUROPRUNE_ENTRY, NEUROPRUNE_PYTHON, OMP_NUM_THREADS, ...)
# Example (2 machines): on both, NEUROPRUNE_NNODES=2 NEUROPRUNE_RDZV_ENDPOINT=host1:29400 \
#   launch/torchrun.sh run.yaml ds_configs/zero3_bf16.json
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_common.sh"

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ ${1:-} == -h || ${1:-} == --help ]] && usage
parse_entry_args "$@" || usage

NPROC=${NEUROPRUNE_NPROC:-2}
NNODES=${NEUROPRUNE_NNODES:-1}
[[ $NPROC =~ ^[1-9][0-9]*$ && $NNODES =~ ^[1-9][0-9]*$ ]] || die "NEUROPRUNE_NPROC/NNODES must be positive integers"
setup_rank_env "$NPROC"

if ((NNODES == 1)); then
  # --standalone: a private rendezvous on a free local port, nothing to configure.
  RUN_ARGS=(--standalone --nnodes 1)
else
  [[ -n ${NEUROPRUNE_RDZV_ENDPOINT:-} ]] || die "NEUROPRUNE_NNODES=$NNODES needs NEUROPRUNE_RDZV_ENDPOINT=host:port"
  RUN_ARGS=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$NEUROPRUNE_RDZV_ENDPOINT"
            --rdzv_id "${NEUROPRUNE_RDZV_ID:-neuroprune}")
fi
exec "$PYTHON" -m torch.distributed.run "${RUN_ARGS[@]}" --nproc_per_node "$NPROC" \
  -m "$ENTRY" "${ENTRY_ARGS[@]}"
