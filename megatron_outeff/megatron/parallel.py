"""Process groups and megatron-core model-parallel state, on GPUs (NCCL) or CPUs (gloo)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_outeff.errors import OutEffError

from .cpu_support import apply_cpu_patches, cuda_available

# What a launcher (torchrun, SLURM's srun wrapper, the deepspeed launcher) tells each rank; init_distributed
# writes the first five itself for a single-process group.
LAUNCHER_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)


def single_process_env(base=None) -> dict:
    """A copy of ``base`` (default: this process's environment) without the launcher's variables
    (``LAUNCHER_ENV``), for a child process that must start its own single-process group: a process that
    called ``init_distributed`` holds RANK / MASTER_PORT of its own group, and children inheriting them
    would all rendezvous on that one port (EADDRINUSE when several run at once)."""
    return {k: v for k, v in (os.environ if base is None else base).items() if k not in LAUNCHER_ENV}


def launcher_world_size() -> int | None:
    """The world size ``init_distributed`` takes from a launcher's environment: WORLD_SIZE when RANK is
    set (torchrun, the SLURM and deepspeed launchers set both), else None (a single-process group: a
    WORLD_SIZE left in the environment without RANK is ignored). An existing process group's own size
    wins. OutEffError naming WORLD_SIZE when it is not a positive integer."""
    if dist.is_initialized():
        return dist.get_world_size()
    if "RANK" not in os.environ:
        return None
    raw = os.environ.get("WORLD_SIZE", "")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise OutEffError(
            f"WORLD_SIZE={raw!r} in the environment (RANK={os.environ['RANK']} is set, so the launcher's "
            "variables are used): expected a positive integer"
        )
    return int(raw)


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Without RANK a single-process group is created on a free local port (overwriting a stale
    WORLD_SIZE), so the same code paths run under plain ``python`` too (``launcher_world_size``
    says which). Backend: NCCL with CUDA, gloo otherwise.
    """
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if cuda_available() else "gloo")
    if launcher_world_size() is None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def init_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    backend: str | None = None,
) -> None:
    """torch.distributed + megatron parallel_state + megatron's model-parallel RNG seeds.

    The world size must be a multiple of TP x PP; the rest is data parallelism.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_cpu_patches()
    init_distributed(backend)
    world = dist.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if tensor_model_parallel_size < 1 or pipeline_model_parallel_size < 1 or world % mp != 0:
        raise ValueError(
            f"tensor_model_parallel_size={tensor_model_parallel_size} x pipeline_model_parallel_size="
            f"{pipeline_model_parallel_size}: expected positive sizes whose product divides the world size {world}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size, pipeline_model_parallel_size=pipeline_model_parallel_size
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def shutdown_distributed() -> None:
    """The end of a process that initialised torch.distributed: megatron's parallel state, then every process
    group, then a garbage collection, all while the interpreter is fully alive.

    Why all three: megatron's parallel_state keeps its groups (a dozen, each with gloo worker threads) in module
    globals, which ``dist.destroy_process_group()`` alone does not release. Their threads then outlive
    ``main()``; when a worker thread drops the last reference to a finished collective during interpreter
    finalization, it needs the GIL to free the tensors, the interpreter ends the thread, and libstdc++
    calls ``std::terminate``: the process aborts (SIGABRT, "terminate called without an active exception")
    after a run that finished and saved. Seen in ~5% of one-process CPU runs (tests/training/test_launch.py);
    the same race as pytorch/pytorch PR 179291. A no-op where torch.distributed was never initialised."""
    import gc

    destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the groups' last references: their worker threads are joined now, not at finalization
