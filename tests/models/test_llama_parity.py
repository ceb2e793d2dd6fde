"""Our megatron Llama against transformers' own LlamaForCausalLM at TP=1, TP=2 (+SP) and PP=2, in ONE
2-process torchrun launch (_llama_parity_worker.py): logits, gradients, the variant against our remote
code, the mapping back (torch.equal), and negative controls for the rotary convention and the GQA
head grouping (the comparison must see both mistakes)."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from parity_testlib import run_worker
from tolerance import network_depth, rounding_bound

# the worker's model (hidden 64, SwiGLU width 96, 2 layers) at its 24 tokens: tests/tolerance.py
DEPTH = network_depth(dict(hidden_size=64, ffn_dim=2 * 96, num_hidden_layers=2, max_position_embeddings=24))
# every megatron layout of the worker that loads transformers' weights (imported, compared, mapped back)
LAYOUTS = [
    "tp1_megatron_attention",
    "tp1",
    "tp2",
    "tp2sp",
    "pp2",
    "tp2_variant",
    "pp2_variant",
    "tp2sp_elementwise",
    "pp2_elementwise",
]


@pytest.fixture(scope="module")
def parity(private_tmp):
    out = Path(tempfile.mkdtemp(prefix="llama-parity-", dir=private_tmp)) / "result.json"
    run_worker("_llama_parity_worker.py", out, timeout=400)
    return json.loads(out.read_text())


def _bound(res, tag):
    return rounding_bound(torch.float32, res[f"{tag}_ref_max"], DEPTH)


@pytest.mark.multiproc
@pytest.mark.parametrize("tag", LAYOUTS + ["llama3_rope"])
def test_logits_match_transformers(parity, tag):
    """fp32 on both sides, summed in other orders (TP/PP splits, other kernels): the derived bound.
    The *_variant / *_elementwise layouts are compared with OutEffLlamaForCausalLM (transformers' Llama with
    the variant's attention: learnable offsets and per-head linear gates; Softmax_1 and the elementwise gate)."""
    assert parity[f"{tag}_max_abs_diff"] <= _bound(parity, tag), parity
    if tag in ("tp2", "tp2sp"):
        assert parity[f"{tag}_padded_vocab"] == 256  # vocab 250 padded for TP=2


@pytest.mark.multiproc
@pytest.mark.parametrize("tag", ["tp1_megatron_attention", "tp2", "tp2sp"])
def test_gradients_match_transformers(parity, tag):
    # relative to each tensor's largest gradient; backward doubles the chain of roundings
    assert parity[f"{tag}_grad_rel_diff"] <= rounding_bound(torch.float32, 1.0, 2 * DEPTH), parity


@pytest.mark.multiproc
@pytest.mark.parametrize("tag", LAYOUTS)
def test_mapping_back_is_identical(parity, tag):
    assert parity[f"{tag}_export_bad"] == []


@pytest.mark.multiproc
@pytest.mark.parametrize("tag", ["wrong_rotary_interleaved", "wrong_gqa_grouping", "llama3_rope_unscaled"])
def test_the_comparison_sees_the_classic_mistakes(parity, tag):
    """Interleaved instead of half-split rotary pairs, query heads attached to the wrong key/value
    groups, or Llama 3.1's RoPE scaling dropped: each is caught by the same bound, by a factor over 100
    (at 24 positions a dropped RoPE scaling moves only the slowest frequencies: the smallest of the three)."""
    assert parity[f"{tag}_max_abs_diff"] > 100 * _bound(parity, tag), (
        parity[f"{tag}_max_abs_diff"],
        _bound(parity, tag),
    )


@pytest.mark.multiproc
def test_variant_reference_differs_and_rope_scaling_was_read(parity):
    assert parity["variant_changes_logits"] > 1e-2 and parity["elementwise_changes_logits"] > 1e-2  # other functions
    assert parity["llama3_rope_scaling_factor"] == 8.0
