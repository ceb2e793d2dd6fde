"""Hugging Face OPT <-> megatron layouts, single process: sharding at any TP/PP, lossless round
trips, and one-line refusals of bad input before anything is touched or written."""

import json
import os
import shutil

import pytest
import torch

from megatron_outeff.models.hf_opt import (
    HF_LM_HEAD,
    hf_state_dict_to_megatron,
    load_hf_opt_dir,
    megatron_to_hf_state_dict,
    save_hf_opt_dir,
)
from megatron_outeff.models.opt import load_arch_config


@pytest.fixture(scope="module")
def hf(hf_opt_dir):
    path, model = hf_opt_dir
    arch, sd = load_hf_opt_dir(path)
    return path, arch, sd, model.state_dict()


def shard_all(sd, arch, tp, pp):
    return {(t, p): hf_state_dict_to_megatron(sd, arch, t, tp, p, pp) for t in range(tp) for p in range(pp)}


def test_loaded_dir_matches_the_model(hf):
    _, arch, sd, ref = hf
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.vocab_size) == (2, 64, 4, 250)
    assert set(sd) | {HF_LM_HEAD} == set(ref)
    assert all(torch.equal(sd[k], ref[k]) for k in sd)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_round_trip_is_identical(hf, tp, pp):
    _, arch, sd, ref = hf
    out = megatron_to_hf_state_dict(shard_all(sd, arch, tp, pp), arch)
    assert list(out) == list(ref)  # same keys, same order as OPTForCausalLM.state_dict()
    for k in ref:
        assert out[k].dtype == ref[k].dtype and torch.equal(out[k], ref[k]), k


def test_qkv_is_interleaved_per_head(hf):
    _, arch, sd, _ = hf
    d, h = arch.head_dim, arch.hidden_size
    for tp_rank in range(2):
        m = hf_state_dict_to_megatron(sd, arch, tp_rank, 2)
        w = m["decoder.layers.1.self_attention.linear_qkv.weight"].view(2, 3, d, h)  # 2 heads per rank
        b = m["decoder.layers.1.self_attention.linear_qkv.bias"].view(2, 3, d)
        for j in range(2):
            head = tp_rank * 2 + j
            for i, name in enumerate("qkv"):
                rows = slice(head * d, (head + 1) * d)
                assert torch.equal(w[j, i], sd[f"model.decoder.layers.1.self_attn.{name}_proj.weight"][rows])
                assert torch.equal(b[j, i], sd[f"model.decoder.layers.1.self_attn.{name}_proj.bias"][rows])


def test_parallel_splits(hf):
    _, arch, sd, _ = hf
    ranks = [hf_state_dict_to_megatron(sd, arch, t, 2, p, 2) for p in range(2) for t in range(2)]
    s00, s10, s01, s11 = ranks
    # Row-parallel biases: the full bias on every rank, never split.
    for s, layer in ((s00, 0), (s10, 0), (s01, 1), (s11, 1)):
        assert torch.equal(
            s["decoder.layers.0.self_attention.linear_proj.bias"],
            sd[f"model.decoder.layers.{layer}.self_attn.out_proj.bias"],
        )
        assert torch.equal(s["decoder.layers.0.mlp.linear_fc2.bias"], sd[f"model.decoder.layers.{layer}.fc2.bias"])
    assert s00["decoder.layers.0.mlp.linear_fc2.weight"].shape == (64, 128)
    assert s00["decoder.layers.0.mlp.linear_fc1.weight"].shape == (128, 64)
    # Vocabulary 250 -> 256 rows, 128 per TP rank; padding rows are zero; positions keep the 2 offset rows.
    emb = sd["model.decoder.embed_tokens.weight"]
    assert torch.equal(s00["embedding.word_embeddings.weight"], emb[:128])
    assert torch.equal(s10["embedding.word_embeddings.weight"][:122], emb[128:])
    assert not s10["embedding.word_embeddings.weight"][122:].any()
    assert s00["embedding.position_embeddings.weight"].shape == (64 + 2, 64)
    # Stage layout: embeddings on stage 0, final norm + tied head copy on the last stage.
    assert "output_layer.weight" not in s00 and "decoder.final_layernorm.weight" not in s00
    assert torch.equal(s11["output_layer.weight"], s10["embedding.word_embeddings.weight"])
    assert "embedding.word_embeddings.weight" not in s01
    assert "output_layer.weight" not in hf_state_dict_to_megatron(sd, arch, 0, 2)  # PP=1: the head IS the embedding


def test_export_accepts_nested_lists_and_wrapper_prefixes(hf):
    _, arch, sd, ref = hf
    shards = shard_all(sd, arch, 2, 2)
    grid = [
        [{"module." + k: v for k, v in shards[(t, p)].items()} | {"module.x._extra_state": None} for t in range(2)]
        for p in range(2)
    ]
    out = megatron_to_hf_state_dict(grid, arch)
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_export_refuses_unmapped_and_untied(hf):
    _, arch, sd, _ = hf
    shards = shard_all(sd, arch, 1, 2)
    shards[(0, 1)]["decoder.layers.0.self_attention.core_attention.softmax_offset"] = torch.zeros(4)
    with pytest.raises(ValueError, match="without a Hugging Face OPT counterpart"):
        megatron_to_hf_state_dict(shards, arch)
    megatron_to_hf_state_dict(shards, arch, strict=False)
    shards[(0, 1)]["output_layer.weight"] = shards[(0, 1)]["output_layer.weight"] + 1
    with pytest.raises(ValueError, match="expected tied copies"):
        megatron_to_hf_state_dict(shards, arch, strict=False)
    shards = shard_all(sd, arch, 2, 1)
    del shards[(1, 0)]["decoder.layers.1.mlp.linear_fc1.bias"]
    with pytest.raises(ValueError, match=r"tp_rank=1, pp_rank=0 lacks 'decoder.layers.1.mlp.linear_fc1.bias'"):
        megatron_to_hf_state_dict(shards, arch)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_input_is_refused(hf, private_tmp):
    path, arch, sd, _ = hf
    # Another architecture.
    other = private_tmp / "gpt2"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_hf_opt_dir(other)
    assert "model_type='gpt2'" in one_line(e)
    # Size mismatch with the target architecture.
    with pytest.raises(ValueError) as e:
        load_hf_opt_dir(path, expected_arch="tiny")
    assert "vocab_size=250" in one_line(e) and "opt-tiny" in one_line(e)
    with pytest.raises(ValueError) as e:
        hf_state_dict_to_megatron(sd, load_arch_config("125m"))
    one_line(e)
    # Heads not divisible by TP.
    with pytest.raises(ValueError) as e:
        hf_state_dict_to_megatron(sd, arch, 0, 3)
    assert "num_attention_heads=4 is not divisible by tensor parallel size 3" in one_line(e)
    # Missing tensors.
    partial = {k: v for k, v in sd.items() if k != "model.decoder.layers.1.fc2.bias"}
    with pytest.raises(ValueError) as e:
        hf_state_dict_to_megatron(partial, arch)
    assert "model.decoder.layers.1.fc2.bias" in one_line(e)
    # Untied head.
    untied = dict(sd)
    untied[HF_LM_HEAD] = sd["model.decoder.embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match="expected tied"):
        hf_state_dict_to_megatron(untied, arch)
    # Pickles are never read.
    pickled = private_tmp / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled / "config.json")
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_hf_opt_dir(pickled)


def test_save_never_overwrites(hf, private_tmp):
    _, arch, sd, ref = hf
    parent = private_tmp / "save"
    parent.mkdir()
    busy = parent / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError) as e:
        save_hf_opt_dir(busy, arch, sd)
    assert "refusing to overwrite" in one_line(e)
    assert os.listdir(busy) == ["keep.txt"] and sorted(os.listdir(parent)) == ["busy"]
    # Refused before writing: bad tensors into a fresh path leave nothing behind either.
    with pytest.raises(ValueError):
        save_hf_opt_dir(parent / "new", arch, {k: v for k, v in sd.items() if "fc1" not in k})
    assert sorted(os.listdir(parent)) == ["busy"]
    # An empty directory is fine; the result reloads identically.
    (parent / "empty").mkdir()
    save_hf_opt_dir(parent / "empty", arch, ref)
    assert sorted(os.listdir(parent / "empty")) == ["config.json", "model.safetensors"]
    arch2, sd2 = load_hf_opt_dir(parent / "empty", expected_arch=arch)
    assert all(torch.equal(sd2[k], sd[k]) for k in sd) and set(sd2) == set(sd)
    assert sorted(os.listdir(parent)) == ["busy", "empty"]  # no temp dirs left
