"""Run megatron-core 0.16 on a machine without CUDA (torch CPU build, gloo process groups).

megatron-core assumes CUDA in a handful of places. Each patch below replaces one assumption with
its CPU equivalent and nothing else; they are applied only when CUDA is absent, once per process:

1. ``torch.cuda.current_device()`` is used as a ``device=`` argument at ~175 call sites (TP
   all-gather outputs, SP buffers, GlobalMemoryBuffer, megatron's off-by-one ``softmax_offset``).
   On CPU it returns the CPU device.
2. The "CUDA" RNG tracker (``model_parallel_cuda_manual_seed``, ``CudaRNGStatesTracker``, the
   activation-checkpoint RNG save/restore) keeps CPU generator states instead: forking a tracked
   state swaps the CPU default generator, exactly as megatron swaps the CUDA one.
3. Default causal masks are built on "cuda": rebuilt on CPU.
4. ``torch.cuda.synchronize()`` (p2p communication, dist_checkpointing) becomes a no-op.
5. Pipeline schedules create a few tensors with ``device="cuda"``: ``cpu_safe_forward_backward_func``
   runs the schedule under a TorchFunctionMode that redirects those factory calls to CPU.
6. With PP > 1 and tied embeddings, ``LanguageModule.setup_embeddings_and_output_layer`` moves the
   shared weight with ``weight.data.cuda()`` before all-reducing it over the embedding group: model
   construction runs under ``cpu_model_construction()``, in which ``Tensor.cuda`` returns the tensor.

Keep megatron's fusion flags off on CPU (bias_gelu/bias_dropout/masked_softmax/persist_layer_norm
/gradient_accumulation_fusion): their kernels are CUDA-only.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_patches() -> bool:
    """Patch megatron-core for CPU execution if CUDA is absent. Idempotent. Returns True if patched."""
    global _APPLIED
    if _APPLIED:
        return True
    if cuda_available():
        return False
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as transformer_utils

    # (1) the "current CUDA device" is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")

    # (2) CPU generator states stand in for CUDA RNG states.
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    def tracker_add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def tracker_fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)

    mp_random.CudaRNGStatesTracker.add = tracker_add
    mp_random.CudaRNGStatesTracker.fork = tracker_fork

    # (3) default causal masks on CPU (both modules imported the function by name).
    @functools.lru_cache(maxsize=None)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask

    # (4) nothing to synchronise on CPU.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    _APPLIED = True
    return True


class _CudaFactoryToCpu(TorchFunctionMode):
    """Redirect tensor factory calls made with device='cuda' to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and not isinstance(device, int) and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def cpu_safe_forward_backward_func(*args, **kwargs):
    """megatron's ``get_forward_backward_func`` whose schedule also runs without CUDA."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    schedule = get_forward_backward_func(*args, **kwargs)
    if cuda_available():
        return schedule

    @functools.wraps(schedule)
    def run_schedule(**schedule_kwargs):
        with _CudaFactoryToCpu():
            return schedule(**schedule_kwargs)

    return run_schedule


@contextlib.contextmanager
def cpu_model_construction():
    """(6) Build megatron models without CUDA: ``Tensor.cuda`` returns the tensor itself, only inside
    this block and only when CUDA is absent (a global patch would hide real device bugs elsewhere)."""
    if cuda_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original
