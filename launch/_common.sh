# Shared by launch/local.sh, launch/hostfile.sh and launch/torchrun.sh (sourced, not run).
# The SLURM scripts do not use it: sbatch copies a batch script away from the checkout, so they are
# self-contained.
#
# Parses "CONFIG [DS_JSON] [key=value ...]" into ENTRY_ARGS and sets the environment every launcher needs.
# Environment knobs (all optional):
#   NEUROPRUNE_ENTRY    python module to run as the entry point        [neuroprune_ds.train]
#   NEUROPRUNE_PYTHON   python interpreter (the venv's)                [python on PATH]
#   OMP_NUM_THREADS     OpenMP threads per rank                        [CPUs / ranks on this node]
#   TORCH_EXTENSIONS_DIR  DeepSpeed's JIT op cache                     [<venv>/torch_extensions]

ENTRY=${NEUROPRUNE_ENTRY:-neuroprune_ds.train}
PYTHON=${NEUROPRUNE_PYTHON:-python}

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# ENTRY_ARGS=(--config CONFIG [--deepspeed DS_JSON] [key=value ...]). The second argument is the DeepSpeed
# JSON unless it looks like an override (contains '='); without it the run config's 'deepspeed' applies.
parse_entry_args() {
  (($# >= 1)) || return 1
  ENTRY_ARGS=(--config "$1")
  shift
  if (($#)) && [[ $1 != *=* ]]; then
    ENTRY_ARGS+=(--deepspeed "$1")
    shift
  fi
  ENTRY_ARGS+=("$@")
}

# Every rank binds GPU LOCAL_RANK (0 .. ranks per node - 1) of those CUDA_VISIBLE_DEVICES shows: with fewer
# visible GPUs than ranks, the ranks beyond them would fail with "invalid device ordinal" after start-up.
check_visible_gpus() {
  local ranks_per_node=$1 visible
  [[ -n ${CUDA_VISIBLE_DEVICES:-} ]] || return 0
  IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
  ((${#visible[@]} >= ranks_per_node)) ||
    die "$ranks_per_node ranks per node but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES shows ${#visible[@]} GPU(s): start at most ${#visible[@]} ranks per node, or make more GPUs visible"
}

# Environment for the ranks. OMP_NUM_THREADS matters most: ZeRO-3 on CPU is ~5x slower when every rank
# opens an OpenMP pool as large as the machine, and the deepspeed launcher does not set it.
setup_rank_env() {
  local ranks_per_node=$1 cpus
  command -v "$PYTHON" >/dev/null || die "python interpreter '$PYTHON' not found (activate the venv or set NEUROPRUNE_PYTHON)"
  check_visible_gpus "$ranks_per_node"
  cpus=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / ranks_per_node > 0 ? cpus / ranks_per_node : 1))}
  # One JIT cache per venv: DeepSpeed rebuilds its ops (~60 s on 2 cores) when the ninja binary differs,
  # so two venvs sharing ~/.cache/torch_extensions keep rebuilding each other's ops.
  if [[ -z ${TORCH_EXTENSIONS_DIR:-} ]]; then
    TORCH_EXTENSIONS_DIR="$("$PYTHON" -c 'import sys; print(sys.prefix)')/torch_extensions"
    export TORCH_EXTENSIONS_DIR
  fi
  export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}
  export PYTHONUNBUFFERED=1
}

# A free TCP port, so concurrent runs on one machine do not collide on 29500.
free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
