"""Llama checkpoints through the converter (single process, no training): Hugging Face Llama in at any TP/PP,
out again losslessly (a plain LlamaForCausalLM for vanilla, our remote code for the rest), reshard, the
variant mapping at any layout, and the refusals as one line with nothing written."""

import json
import runpy
from pathlib import Path

import evallib
import pytest
import torch
from hf_testlib import TINY_LLAMA
from safetensors.torch import load_file
from train_testlib import tiny_arch

from megatron_outeff.checkpoint_format import MANIFEST, read_model_files, resolve_model_dir, variant_hf_shapes
from megatron_outeff.convert import from_hf, reshard, to_hf
from megatron_outeff.errors import OutEffError
from megatron_outeff.models.hf_llama import hf_expected_shapes, hf_state_dict_to_megatron, megatron_to_hf_state_dict
from megatron_outeff.ops.variants import AttentionVariantConfig

ROOT = Path(__file__).resolve().parents[2]
CLI = runpy.run_path(str(ROOT / "tools" / "convert_checkpoint.py"))["main"]
ARCH = tiny_arch("llama", num_query_groups=2, ffn_hidden_size=96)  # grouped-query attention


def _random_hf_llama(path):
    """hf_testlib's tiny Llama with vocabulary 250 (padding rows at TP=2) and 64 positions, random
    (evallib.save_random_hf), saved to ``path``: its state dict as written."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**dict(TINY_LLAMA, vocab_size=250, max_position_embeddings=64))
    return evallib.save_random_hf(LlamaForCausalLM(config), path)


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_from_hf_to_hf_is_lossless_at_tp2_pp2(tmp_path):
    original = _random_hf_llama(tmp_path / "llama")  # vocab 250: padding rows at TP=2
    ck = from_hf(tmp_path / "llama", tmp_path / "ck", tp=2, pp=2)
    m, states = read_model_files(resolve_model_dir(ck))
    assert (m["family"], m["tp"], m["pp"], m["padded_vocab_size"], m["source"]) == ("llama", 2, 2, 256, "from-hf")
    assert m["arch"]["num_query_groups"] == 2 and "output_layer.weight" in states[(1, 1)]
    back = to_hf(ck, tmp_path / "back")
    cfg = json.loads((back / "config.json").read_text())
    assert (
        cfg["model_type"] == "llama"
        and cfg["architectures"] == ["LlamaForCausalLM"]
        and cfg["num_key_value_heads"] == 2
    )
    assert sorted(p.name for p in back.glob("*.py")) == []  # vanilla: transformers' own class, no remote code
    _assert_same(load_file(str(back / "model.safetensors")), original)
    # reshard keeps every tensor, padding rows of the untied LM head included
    r1 = reshard(ck, tmp_path / "tp1", tp=1, pp=1)
    r2 = reshard(r1, tmp_path / "tp2pp2", tp=2, pp=2)
    for rank, sd in read_model_files(resolve_model_dir(r2))[1].items():
        _assert_same(sd, states[rank])


def test_saved_rotary_buffers_of_older_conversions_are_ignored(tmp_path):
    """Llama checkpoints converted by older transformers hold model.layers.N.self_attn.rotary_emb.inv_freq:
    derived from rope_theta, not weights; the import ignores them and the export is transformers' own."""
    from safetensors.torch import save_file

    original = _random_hf_llama(tmp_path / "llama")
    d = 16
    buffers = {
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, d, 2) / d) for i in range(2)
    }
    save_file({**original, **buffers}, str(tmp_path / "llama" / "model.safetensors"), metadata={"format": "pt"})
    back = to_hf(from_hf(tmp_path / "llama", tmp_path / "ck"), tmp_path / "back")
    _assert_same(load_file(str(back / "model.safetensors")), original)


@pytest.mark.parametrize("gate, tensor", [("linear", "gate.weight"), ("elementwise", "gate_proj.weight")])
def test_remote_code_round_trip_and_contradicting_variant(tmp_path, gate, tensor):
    _random_hf_llama(tmp_path / "llama")
    ck = from_hf(
        tmp_path / "llama", tmp_path / "ck", tp=2, pp=1, variant=f'{{"softmax": "softmax1", "gate": "{gate}"}}'
    )
    hf1 = to_hf(ck, tmp_path / "hf1")
    cfg = json.loads((hf1 / "config.json").read_text())
    assert cfg["model_type"] == "outeff_llama" and cfg["softmax"] == "softmax1" and cfg["gate"] == gate
    ck2 = from_hf(hf1, tmp_path / "ck2", tp=1, pp=2)  # the variant comes from config.json
    assert json.loads((resolve_model_dir(ck2) / MANIFEST).read_text())["attention"]["gate"] == gate
    hf2 = to_hf(ck2, tmp_path / "hf2")
    a, b = load_file(str(hf1 / "model.safetensors")), load_file(str(hf2 / "model.safetensors"))
    assert f"model.layers.1.self_attn.{tensor}" in a
    _assert_same(a, b)
    with pytest.raises(OutEffError, match="contradicts"):
        from_hf(hf1, tmp_path / "ck3", variant="learnable")
    assert not (tmp_path / "ck3").exists()


@pytest.mark.parametrize("gate", ["linear", "mlp", "shared_linear", "elementwise"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_variant_tensors_round_trip_at_any_layout(gate, tp, pp):
    torch.manual_seed(0)
    variant = AttentionVariantConfig(softmax="learnable", gate=gate)
    shapes = {**hf_expected_shapes(ARCH), **variant_hf_shapes(ARCH, variant)}
    assert all(k.startswith(("model.", "lm_head")) for k in shapes)
    hf = {k: torch.randn(s) for k, s in shapes.items()}
    ranks = {
        (t, p): hf_state_dict_to_megatron(hf, ARCH, t, tp, p, pp, variant=variant) for t in range(tp) for p in range(pp)
    }
    sd, heads, local = ranks[(tp - 1, pp - 1)], 4 // tp, ARCH.num_layers // pp - 1
    hp, mp = f"model.layers.{ARCH.num_layers - 1}.self_attn.", f"decoder.layers.{local}.self_attention."
    assert torch.equal(sd[mp + "core_attention.softmax_offset"], hf[hp + "softmax_offset"][-heads:])
    if gate == "elementwise":  # the last group's rows: [its 2 query heads, their gate rows, k, v] (no bias: Llama)
        d = ARCH.head_dim
        block = sd[mp + "linear_qkv.weight"].view(-1, 6, d, 64)[-1]
        assert torch.equal(block[2:4].reshape(-1, 64), hf[hp + "gate_proj.weight"][-2 * d :])
        assert hp + "gate_proj.bias" not in hf
    else:
        bias = "fc2_bias" if gate == "mlp" else "bias"
        assert torch.equal(sd[mp + "head_gate.bias"], hf[hp + f"gate.{bias}"][-heads:])
    _assert_same(megatron_to_hf_state_dict(ranks, ARCH, variant=variant), hf)
    # without the variant: its tensors refused (strict), or linear_qkv's gate rows not taken for a plain Llama's
    with pytest.raises(
        OutEffError,
        match="linear_qkv.weight has 192 rows, expected 128"
        if gate == "elementwise"
        else "without a Hugging Face Llama counterpart",
    ):
        megatron_to_hf_state_dict(ranks, ARCH)
    with pytest.raises(OutEffError, match="missing|not a tensor of the attention variant"):
        hf_state_dict_to_megatron(
            hf, ARCH, 0, tp, 0, pp, variant=AttentionVariantConfig(gate="linear" if gate != "linear" else "mlp")
        )


def test_swiglu_and_gqa_layout_per_rank():
    """fc1 of rank r is [gate rows of r; up rows of r] (megatron's GLU halves each rank's output); the
    fused QKV rows of rank r are its key/value groups, each [its 2 query heads, k, v]."""
    torch.manual_seed(0)
    hf = {k: torch.randn(s) for k, s in hf_expected_shapes(ARCH).items()}
    p, d = "model.layers.0.", ARCH.head_dim
    for r in range(2):
        sd = hf_state_dict_to_megatron(hf, ARCH, r, 2)
        gate, up = sd["decoder.layers.0.mlp.linear_fc1.weight"].chunk(2)
        assert torch.equal(gate, hf[p + "mlp.gate_proj.weight"].chunk(2)[r])
        assert torch.equal(up, hf[p + "mlp.up_proj.weight"].chunk(2)[r])
        qkv = sd["decoder.layers.0.self_attention.linear_qkv.weight"].view(4, d, 64)  # 1 group: q, q, k, v
        assert torch.equal(qkv[:2].reshape(-1, 64), hf[p + "self_attn.q_proj.weight"][2 * r * d : (2 * r + 2) * d])
        assert torch.equal(qkv[2], hf[p + "self_attn.k_proj.weight"][r * d : (r + 1) * d])
        assert torch.equal(qkv[3], hf[p + "self_attn.v_proj.weight"][r * d : (r + 1) * d])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tie_word_embeddings": True}, "tie_word_embeddings=True: expected False"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}, "rope_type='linear'"),
    ],
)
def test_unsupported_llama_is_one_line_and_writes_nothing(tmp_path, capsys, change, message):
    _random_hf_llama(tmp_path / "llama")
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps({**cfg, **change}))
    capsys.readouterr()
    code = CLI(["from-hf", str(tmp_path / "llama"), "--output-dir", str(tmp_path / "out"), "--tp", "2", "--pp", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_layout_the_model_cannot_divide_is_refused(tmp_path):
    _random_hf_llama(tmp_path / "llama")
    with pytest.raises(OutEffError, match="num_query_groups=2 is not divisible by tensor parallel size 4"):
        from_hf(tmp_path / "llama", tmp_path / "out", tp=4, pp=1)
    assert not (tmp_path / "out").exists()
