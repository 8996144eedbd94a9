"""Launcher-agnostic torch.distributed environment, and a clean way for worker processes to exit.

``python -m neuroprune_ds.train`` is started by the ``deepspeed`` launcher, by ``torchrun``, by ``srun`` on a
SLURM cluster, or by hand. ``deepspeed.init_distributed()`` reads only RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT (without them it tries mpi4py and fails), so under ``srun`` the SLURM variables
have to be translated first. :func:`setup_distributed_env` does that, never overriding anything a launcher
already set, and also sets ``OMP_NUM_THREADS`` (ZeRO-3 on CPU is ~5x slower with one OpenMP pool per rank
sized to the whole machine).

Everything except :func:`setup_distributed_env` and :func:`barrier_and_exit` is pure: it reads a mapping and
returns values, so the logic is unit-tested without a cluster.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from typing import Callable, Mapping, MutableMapping

log = logging.getLogger(__name__)

#: The variables torch.distributed / DeepSpeed read.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

#: Exit status meaning "I checkpointed because of a preemption signal; requeue me" (launch/slurm/*.sbatch
#: run ``scontrol requeue`` when the job step exits with it).
EXIT_REQUEUE = 85

#: Exit status of an input the user must fix (a config, a path, data): ``train``, ``validate`` and ``convert``.
EXIT_INVALID = 2

# MASTER_PORT derived from the job id stays below Linux's default ephemeral range (32768-60999), where an
# outgoing connection could already hold it.
_PORT_BASE = 15000
_PORT_SPAN = 17000


# ----------------------------------------------------------------------------------------- nodelists --

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in nodelist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in nodelist {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, whole: str) -> list[str]:
    """Expand the inside of one bracket, e.g. ``01-03,7`` -> ``['01', '02', '03', '7']``.

    Zero padding follows the width of the range's first bound, as SLURM does.
    """
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"bad range {item!r} in nodelist {whole!r}")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"descending range {item!r} in nodelist {whole!r}")
        width = len(lo_s)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def _expand_one(name: str, whole: str) -> list[str]:
    """Expand one comma-free host expression; several brackets give their cartesian product."""
    m = re.search(r"\[([^\[\]]*)\]", name)
    if m is None:
        if "[" in name or "]" in name:
            raise ValueError(f"bad brackets in nodelist {whole!r}")
        return [name]
    head, tail = name[: m.start()], name[m.end():]
    return [head + mid + rest
            for mid in _expand_range_set(m.group(1), whole)
            for rest in _expand_one(tail, whole)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist (``node[1-2]``, ``a,b``, ``n[01-03,7]``, ``r[1-2]-n[1-2]``) to host names.

    Pure Python, so it works where ``scontrol show hostnames`` is unavailable. Order is preserved: the first
    name is the first node of the allocation.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty nodelist")
    hosts = []
    for part in _split_top_level(nodelist):
        part = part.strip()
        if not part:
            raise ValueError(f"empty element in nodelist {nodelist!r}")
        hosts.extend(_expand_one(part, nodelist))
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM's compressed per-node counts, e.g. ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# ------------------------------------------------------------------------------------ launcher logic --

def detect_launcher(environ: Mapping[str, str]) -> str:
    """Name what started this process: ``torchrun``, ``deepspeed``, ``env`` (RANK/WORLD_SIZE set by someone
    else), ``srun`` (a SLURM job step), ``slurm-batch`` (a batch script without srun) or ``none``."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        if "TORCHELASTIC_RUN_ID" in environ:
            return "torchrun"
        if "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
            return "deepspeed"
        return "env"
    if "SLURM_PROCID" in environ:
        # Job steps (srun) carry a step id; the batch script itself does not, and its SLURM_NTASKS is the
        # whole job's, so treating it as a rank would wait forever for peers that never start.
        if "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ:
            return "srun"
        return "slurm-batch"
    return "none"


def slurm_master_port(job_id: str | int) -> int:
    """A rendezvous port derived from the SLURM job id, identical on every node of the job."""
    return _PORT_BASE + int(job_id) % _PORT_SPAN


def _slurm_local_world_size(environ: Mapping[str, str]) -> int | None:
    """Tasks of this step on this node, from the per-node layout SLURM exports."""
    node_id = int(environ.get("SLURM_NODEID", "0"))
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(key):
            counts = expand_tasks_per_node(environ[key])
            if node_id < len(counts):
                return counts[node_id]
    if environ.get("SLURM_NTASKS_PER_NODE"):
        return int(environ["SLURM_NTASKS_PER_NODE"])
    return None


def _slurm_local_rank(environ: Mapping[str, str], local_world_size: int | None) -> str:
    """The task's device index among the GPUs it sees (DeepSpeed binds cuda:LOCAL_RANK).

    With ``--gpus-per-node`` every task of a node sees all its GPUs (CUDA_VISIBLE_DEVICES lists them) and
    task SLURM_LOCALID takes device SLURM_LOCALID. With ``--gpus-per-task=1`` (or ``--gpu-bind=single:1``)
    SLURM shows each task only its own GPU, as device 0: fewer devices than tasks on the node, so 0.
    """
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and local_world_size is not None and len(visible) < local_world_size:
        return "0"
    return environ.get("SLURM_LOCALID", "0")


def _slurm_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, ... of an srun task (before filtering out what is already set)."""
    local_ws = _slurm_local_world_size(environ)
    out = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1",
        "LOCAL_RANK": _slurm_local_rank(environ, local_ws),
    }
    if local_ws is not None:
        out["LOCAL_WORLD_SIZE"] = str(local_ws)
    nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                or environ.get("SLURM_NODELIST"))
    if nodelist:
        out["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if job_id:
        out["MASTER_PORT"] = str(slurm_master_port(job_id))
    return out


def _single_process_vars(port: int) -> dict[str, str]:
    """A world of one, so ``deepspeed.init_distributed()`` works without any launcher."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def omp_threads(environ: Mapping[str, str], cpu_count: int) -> int:
    """OpenMP threads per rank: the task's CPUs under SLURM, else this process's CPUs / ranks on the node.

    ``cpu_count`` is what this process may run on (``os.sched_getaffinity``). ``environ`` must already hold
    the final LOCAL_WORLD_SIZE (or the deepspeed launcher's LOCAL_SIZE).
    """
    if environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(environ["SLURM_CPUS_PER_TASK"]))
    local_ws = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or 1)
    cpus = cpu_count
    if environ.get("SLURM_CPUS_ON_NODE"):
        # Without task binding (task/none) affinity shows the whole machine; the job's share may be smaller.
        cpus = min(cpus, int(environ["SLURM_CPUS_ON_NODE"]))
    return max(1, cpus // max(1, local_ws))


def env_from_launcher(environ: Mapping[str, str] | None = None, cpu_count: int | None = None,
                      port_picker: Callable[[], int] | None = None) -> dict[str, str]:
    """Return the variables to ADD to ``environ`` for torch.distributed; keys already set are never returned.

    * deepspeed / torchrun / anything that set RANK and WORLD_SIZE: only missing extras (LOCAL_WORLD_SIZE,
      OMP_NUM_THREADS).
    * an srun task: SLURM_PROCID->RANK, SLURM_NTASKS->WORLD_SIZE, SLURM_LOCALID->LOCAL_RANK (0 when the task
      sees only its own GPU, see :func:`_slurm_local_rank`), tasks on this node->LOCAL_WORLD_SIZE, first host of the step's nodelist->MASTER_ADDR, job id->MASTER_PORT.
    * nothing (or a SLURM batch script without srun): a single-process world on 127.0.0.1 and a free port.
    """
    environ = os.environ if environ is None else environ
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    kind = detect_launcher(environ)
    if kind == "srun":
        proposed = _slurm_vars(environ)
    elif kind in ("none", "slurm-batch"):
        port = environ.get("MASTER_PORT") or (port_picker or free_port)()
        proposed = _single_process_vars(int(port))
    else:
        proposed = {}
        if "LOCAL_SIZE" in environ:  # the deepspeed launcher's name for it
            proposed["LOCAL_WORLD_SIZE"] = environ["LOCAL_SIZE"]
    added = {k: v for k, v in proposed.items() if k not in environ}
    if "OMP_NUM_THREADS" not in environ:
        added["OMP_NUM_THREADS"] = str(omp_threads({**environ, **added}, cpu_count))
    return added


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for single-process runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Fill in the torch.distributed variables for the current launcher; return what was added.

    Call it first thing in the entry point, before importing anything that reads OMP_NUM_THREADS (torch
    reads it at import) and before ``deepspeed.init_distributed()``.
    """
    environ = os.environ if environ is None else environ
    kind = detect_launcher(environ)
    if kind == "slurm-batch":
        log.warning("running inside a SLURM batch script without srun: starting a single process; "
                    "use 'srun python -m ...' to start one rank per task")
    added = env_from_launcher(environ)
    environ.update(added)
    torch = sys.modules.get("torch")
    if "OMP_NUM_THREADS" in added and torch is not None and environ is os.environ:
        # OpenMP read the variable when torch was imported: set the pool size directly as well.
        torch.set_num_threads(int(added["OMP_NUM_THREADS"]))
    if added:
        log.info("launcher %s: set %s", kind, " ".join(f"{k}={v}" for k, v in sorted(added.items())))
    return added


# ------------------------------------------------------------------------------------------------ exit --

def barrier_and_exit(code: int = 0, barrier: bool = True) -> None:
    """End a worker process: barrier with the other ranks, flush, then ``os._exit(code)``.

    Interpreter shutdown with live gloo/DeepSpeed state aborted about 1 run in 8 (``terminate called without
    an active exception``) after training had finished; skipping it removed the aborts. Close your own files
    (TensorBoard writers, checkpoints) before calling this: nothing else runs afterwards. Pass
    ``barrier=False`` when the other ranks may be gone (error paths), or the barrier would hang.
    """
    if barrier:
        try:
            dist = sys.modules.get("torch.distributed")  # never initialised if torch was never imported
            if dist is not None and dist.is_available() and dist.is_initialized():
                dist.barrier()
        except Exception as exc:  # a failed barrier must not turn a clean exit into a hang or a traceback
            print(f"barrier_and_exit: barrier failed: {exc}", file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
