"""Test-session set-up shared by every test.

On a machine without CUDA the Triton kernels run under the Triton interpreter, which must be
switched on before any kernel is decorated, so it is set here before the package is imported.
GPU-only tests carry the `gpu` marker and are skipped without CUDA.
"""

import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (compiled Triton)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: that matches a folder named gpu
            item.add_marker(skip_gpu)


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# As the session found them: a session-scoped fixture that trains in-process (tests/training/conftest.py
# ``oracle``) is set up before the first module's own fixtures, so values saved at a module's start could
# already be its leftovers (a later module's subprocess then inherited RANK and a port still bound here).
_SESSION_DIST_ENV = {k: os.environ.get(k) for k in _DIST_ENV}


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_across_modules():
    """Each test module leaves no torch.distributed process group, megatron parallel state or the
    rendezvous variables a single-process group sets (megatron_outeff.megatron.parallel.init_distributed)
    behind: no module depends on another having run before it (the suite passes in shuffled order)."""
    saved = dict(_SESSION_DIST_ENV)
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        from megatron_outeff.megatron.parallel import destroy_model_parallel

        destroy_model_parallel()
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def run_compiled_triton():
    """A function script -> CompletedProcess that runs `python -c script` in a subprocess with compiled
    Triton (TRITON_INTERPRET removed) and the repository on PYTHONPATH: for ahead-of-time compiles
    of the kernels on a machine without a GPU."""
    return _run_compiled_triton


def _run_compiled_triton(script: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_opt():
    """A tiny random Hugging Face OPTForCausalLM (transformers' own implementation), in eval mode: the export
    tests' tiny OPT (tests/hf/hf_testlib.py TINY) at 512 words, 64 positions, FFN 256, init std 0.05."""
    from transformers import OPTConfig, OPTForCausalLM

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf"))
    from hf_testlib import TINY

    torch.manual_seed(0)
    shape = dict(vocab_size=512, ffn_dim=256, max_position_embeddings=64, word_embed_proj_dim=64)
    return OPTForCausalLM(OPTConfig(**dict(TINY, **shape, do_layer_norm_before=True, init_std=0.05))).eval()
