"""A random, fully non-trivial Hugging Face OPT built offline: the reference nobody here wrote."""

import sys
import tempfile
from pathlib import Path

import pytest
import torch
from parity_testlib import randomise_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import hf_testlib  # noqa: E402

# hf_testlib's tiny OPT with vocabulary 250 (not a multiple of 8 * tp: exercises megatron's vocabulary padding),
# FFN 256 and 64 positions
TINY_HF = dict(hf_testlib.TINY, vocab_size=250, ffn_dim=256, max_position_embeddings=64)


def make_hf_opt(seed: int = 0, **overrides):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(**{**TINY_HF, **overrides})
    cfg._attn_implementation = "eager"
    return randomise_(OPTForCausalLM(cfg).eval())  # every bias, LayerNorm and offset row random


@pytest.fixture(scope="session")
def private_tmp():
    """A temporary directory of our own: pytest's shared basetemp (/tmp/pytest-of-USER) rotates
    away directories while concurrent pytest sessions of other checkouts run."""
    with tempfile.TemporaryDirectory(prefix="outeff-opt-tests-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def hf_opt_dir(private_tmp):
    """(directory, model): a random tiny OPTForCausalLM saved with save_pretrained (safetensors)."""
    model = make_hf_opt()
    path = private_tmp / "tiny-opt"
    model.save_pretrained(str(path), safe_serialization=True)
    return path, model


@pytest.fixture(scope="session")
def hf_opt_350m_dir(private_tmp):
    """(directory, model): OPT-350m's shape in miniature (post-LayerNorm, 32-wide embeddings projected
    to the 64-wide model), random, saved with save_pretrained."""
    model = make_hf_opt(seed=2, do_layer_norm_before=False, word_embed_proj_dim=32)
    path = private_tmp / "tiny-opt-350m"
    model.save_pretrained(str(path), safe_serialization=True)
    return path, model
