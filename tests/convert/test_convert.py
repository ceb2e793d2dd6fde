"""Checkpoint conversion: training checkpoints (TP=2, ZeRO-3) -> Hugging Face / other layouts / back.

One torchrun launch (convert_worker.py, 2 processes) trains and restarts; everything else runs here.
"""

import json
import math
import re
import shutil
import sys
from pathlib import Path

import evallib
import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerance import assert_close_bound, network_depth, rounding_bound
from train_testlib import ROOT, assert_exit_0, load_tp1, run, run_tool, run_torchrun

from megatron_outeff.checkpoint_format import MANIFEST, read_model_files, resolve_model_dir
from megatron_outeff.convert import from_hf, reshard, to_hf
from megatron_outeff.errors import OutEffError

# The training tests' model (the tiny arch, vocabulary 256, 32 tokens): float32 rounding chain (tests/tolerance.py)
DEPTH = network_depth(dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, max_position_embeddings=32)) + 256

WORKER = str(Path(__file__).with_name("convert_worker.py"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert")
    assert_exit_0(run_torchrun(WORKER, out, timeout=500))
    return out


def _files(ckpt):
    """{(tp, pp): state dict} of a checkpoint's model files (all checks of read_model_files)."""
    manifest, states = read_model_files(resolve_model_dir(ckpt))
    return manifest, states


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for rank in a:
        assert sorted(a[rank]) == sorted(b[rank]), rank
        for k in a[rank]:
            assert torch.equal(a[rank][k], b[rank][k]), (rank, k)


@pytest.mark.multiproc
def test_checkpoints_hold_model_files(trained):
    m, states = _files(trained / "src")
    assert (m["tp"], m["pp"], m["iteration"], m["seq_length"], m["dtype"]) == (2, 1, 2, 32, "fp32")
    assert m["attention"]["softmax"] == "learnable" and m["attention"]["gate"] == "linear"
    assert sorted(states) == [(0, 0), (1, 0)]
    key = "decoder.layers.0.self_attention.core_attention.softmax_offset"
    assert states[(0, 0)][key].shape == (2,) and not torch.equal(states[(0, 0)][key], states[(1, 0)][key])
    # ZeRO-3 (DP=2): the partitioned parameters are gathered, not saved as empty placeholders
    m3, z3 = _files(trained / "z3")
    assert (m3["tp"], m3["pp"]) == (1, 1) and m3["attention"]["gate"] == "mlp"
    sd = z3[(0, 0)]
    assert sd["decoder.layers.1.mlp.linear_fc1.weight"].shape == (256, 64)
    assert sd["decoder.layers.1.self_attention.head_gate.fc1_weight"].shape == (4, 4, 16)
    assert all(v.numel() and v.abs().sum() > 0 for k, v in sd.items() if k.endswith("weight"))
    # ... and they are the trained weights: the same step under ZeRO-0
    z0 = _files(trained / "z0")[1][(0, 0)]
    assert sorted(z0) == sorted(sd)
    for k in sd:
        assert torch.allclose(sd[k], z0[k], atol=1e-5, rtol=0), k


@pytest.mark.multiproc
def test_pipeline_checkpoint_converts(trained, tmp_path):
    m, states = _files(trained / "pp2")
    assert (m["tp"], m["pp"]) == (1, 2) and "output_layer.weight" in states[(0, 1)]
    assert (
        "embedding.word_embeddings.weight" not in states[(0, 1)] and "decoder.final_layernorm.weight" in states[(0, 1)]
    )
    to_hf(trained / "pp2", tmp_path / "hf")
    back = _files(reshard(trained / "pp2", tmp_path / "r", tp=2, pp=1))[1]
    assert torch.equal(
        torch.cat([back[(t, 0)]["embedding.word_embeddings.weight"] for t in range(2)]),
        states[(0, 0)]["embedding.word_embeddings.weight"],
    )


@pytest.mark.multiproc
def test_init_from_refuses_another_variant(trained):
    from megatron_outeff.megatron.variant import AttentionVariantConfig
    from megatron_outeff.models.opt import OPTArchConfig

    arch = OPTArchConfig.from_dict(json.loads((resolve_model_dir(trained / "src") / MANIFEST).read_text())["arch"])
    with pytest.raises(OutEffError, match="attention variant"):
        load_tp1(torch.nn.Module(), trained / "src", arch=arch, variant=AttentionVariantConfig(softmax="softmax1"))
    with pytest.raises(OutEffError, match="hidden_size"):
        import dataclasses

        load_tp1(
            torch.nn.Module(),
            trained / "src",
            arch=dataclasses.replace(arch, hidden_size=128),
            variant=AttentionVariantConfig(softmax="learnable", gate="linear"),
        )


@pytest.mark.multiproc
def test_reshard_round_trips_are_identical(trained, tmp_path):
    _, original = _files(trained / "src")
    for name in ("r_tp1", "r_pp2"):  # written by the worker from src
        back = reshard(trained / name, tmp_path / f"{name}_back", tp=2, pp=1)
        _assert_same(_files(back)[1], original)
    m, r_pp2 = _files(trained / "r_pp2")
    assert (m["tp"], m["pp"], m["source"]) == (1, 2, "reshard")
    assert torch.equal(r_pp2[(0, 1)]["output_layer.weight"], r_pp2[(0, 0)]["embedding.word_embeddings.weight"])
    assert (trained / "r_pp2" / "latest").read_text().strip() == "iter_0000002"


@pytest.mark.multiproc
def test_training_starts_from_resharded_weights(trained):
    results = json.loads((trained / "results.json").read_text())
    source = results["init_src_tp2"][0]  # the source model (TP=2 files as saved) on the first batch
    bound = rounding_bound(torch.float32, source, DEPTH)  # the same float32 loss in another layout
    assert source == pytest.approx(results["init_tp1_dp2"][0], abs=bound)
    assert source == pytest.approx(results["init_pp2"][0], abs=bound)
    assert source != pytest.approx(results["src"][0], abs=bound)  # trained weights, not the initial ones


@pytest.mark.multiproc
def test_to_hf_reproduces_megatron_logits(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = to_hf(trained / "src", tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "outeff_opt" and cfg["softmax"] == "learnable" and cfg["gate"] == "linear"
    ref = load_file(str(trained / "megatron_logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    want = ref["logits"][..., : logits.shape[-1]]
    assert_close_bound(logits, want, rounding_bound(torch.float32, want.abs().max(), DEPTH), "HF vs megatron logits")


@pytest.mark.multiproc
def test_zero3_checkpoint_converts(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = to_hf(trained / "z3", tmp_path / "hf3", dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True).eval()
    assert model.config.gate == "mlp" and model.config.softmax == "softmax1" and model.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits.float()).all()


def _random_hf_opt(path, vocab=250):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, ffn_dim=256, max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.1)
    return evallib.save_random_hf(OPTForCausalLM(OPTConfig(**dict(evallib.TINY, **shape))), path)


def test_from_hf_to_hf_is_identical(tmp_path):
    original = _random_hf_opt(tmp_path / "opt")  # vocab 250: padded rows at TP=2
    ck = from_hf(tmp_path / "opt", tmp_path / "ck", tp=2, pp=2)
    m, states = _files(ck)
    assert (m["tp"], m["pp"], m["padded_vocab_size"], m["source"]) == (2, 2, 256, "from-hf")
    back = to_hf(ck, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["model_type"] == "opt"  # vanilla: plain OPT
    again = load_file(str(back / "model.safetensors"))
    assert sorted(again) == sorted(original)
    for k in original:
        assert torch.equal(again[k], original[k]), k


def test_from_hf_with_variant_and_our_remote_code_dirs(tmp_path):
    _random_hf_opt(tmp_path / "opt")
    variant = '{"softmax": "learnable", "gate": "mlp", "gate_init_prob": 0.5}'
    ck = from_hf(tmp_path / "opt", tmp_path / "ck", tp=2, pp=1, variant=variant)
    sd = _files(ck)[1][(1, 0)]
    assert torch.equal(sd["decoder.layers.0.self_attention.head_gate.bias"], torch.zeros(2))  # logit(0.5)
    hf1 = to_hf(ck, tmp_path / "hf1")
    ck2 = from_hf(hf1, tmp_path / "ck2", tp=1, pp=2)  # the variant comes from config.json
    assert json.loads((resolve_model_dir(ck2) / MANIFEST).read_text())["attention"]["gate"] == "mlp"
    hf2 = to_hf(ck2, tmp_path / "hf2")
    a, b = load_file(str(hf1 / "model.safetensors")), load_file(str(hf2 / "model.safetensors"))
    assert sorted(a) == sorted(b) and "model.decoder.layers.1.self_attn.gate.fc2_bias" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(OutEffError, match="contradicts"):
        from_hf(hf1, tmp_path / "ck3", variant="softmax1")
    assert not (tmp_path / "ck3").exists()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return resolve_model_dir(dst)


def _one_line_error(fn, match):
    with pytest.raises(OutEffError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


@pytest.mark.multiproc
def test_bad_inputs_are_one_line_errors_and_write_nothing(trained, tmp_path):
    out = tmp_path / "out"
    # a missing rank file
    md = _copy(trained / "src", tmp_path / "missing")
    (md / "tp01_pp00.safetensors").unlink()
    _one_line_error(lambda: to_hf(tmp_path / "missing", out), "missing for tp=2")
    # manifest says TP=1 while there are 2 rank files; TP=4 while there are 2
    md = _copy(trained / "src", tmp_path / "tp_mismatch")
    m = json.loads((md / MANIFEST).read_text())
    (md / MANIFEST).write_text(json.dumps(dict(m, tp=1)))
    _one_line_error(lambda: reshard(tmp_path / "tp_mismatch", out, tp=1, pp=1), "outside the manifest")
    (md / MANIFEST).write_text(json.dumps(dict(m, tp=4)))
    _one_line_error(lambda: reshard(tmp_path / "tp_mismatch", out, tp=1, pp=1), "missing for tp=4")
    # a NaN weight
    md = _copy(trained / "src", tmp_path / "nan")
    sd = load_file(str(md / "tp01_pp00.safetensors"))
    sd["decoder.layers.1.mlp.linear_fc1.weight"][3, 3] = float("nan")
    save_file(sd, str(md / "tp01_pp00.safetensors"))
    _one_line_error(lambda: to_hf(tmp_path / "nan", out), "non-finite")
    # an unknown variant
    md = _copy(trained / "src", tmp_path / "variant")
    (md / MANIFEST).write_text(json.dumps(dict(m, attention={"softmax": "softmax7"})))
    _one_line_error(lambda: to_hf(tmp_path / "variant", out), "softmax7")
    assert not out.exists()
    # an output directory that already holds something: refused, left untouched
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(lambda: reshard(trained / "src", out, tp=1, pp=1), "not an empty directory")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # the CLI: exit 2, one line on stderr
    r = run_tool("convert_checkpoint", "to-hf", tmp_path / "missing", "--output-dir", tmp_path / "cli_out", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:"), r.stderr
    assert not (tmp_path / "cli_out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.multiproc
def test_iteration_selection(trained, tmp_path):
    assert to_hf(trained / "src", tmp_path / "hf", iteration=2).is_dir()
    _one_line_error(lambda: to_hf(trained / "src", tmp_path / "hf5", iteration=5), "iter_0000005 not found")
    assert to_hf(trained / "src" / "iter_0000002", tmp_path / "hf_iterdir").is_dir()  # an iter_ directory itself


@pytest.mark.multiproc
def test_cli_round_trip(trained, tmp_path):
    r = run_tool(
        "convert_checkpoint",
        "reshard",
        trained / "src",
        "--output-dir",
        tmp_path / "r",
        "--tp",
        1,
        "--pp",
        2,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote iter_0000002/model/tp00_pp01.safetensors" in r.stdout
    _assert_same(_files(tmp_path / "r")[1], _files(trained / "r_pp2")[1])


def _documented_names():
    """Patterns of every file and directory name that megatron_outeff/checkpoint_format/README.md shows
    in its tree and its table of DeepSpeed's files (``iter_0000100`` / ``rankNNNNN`` / ``mp_rank_MM``:
    any digits; ``[bf16_]``: optional)."""
    text = (ROOT / "megatron_outeff" / "checkpoint_format" / "README.md").read_text()
    tree = text.split("## The tree", 1)[1].split("```", 2)[1]
    deepspeed = text.split("### DeepSpeed's files", 1)[1].split("## Atomicity", 1)[0]
    file_name = r"(?:\[bf16_\])?\w+\.(?:pt|py|json|safetensors)\b"
    names = set(re.findall(file_name, tree + deepspeed)) | set(re.findall(r"(?<![.\w])([a-z]\w*)/", tree)) | {"latest"}
    patterns = []
    for name in names:
        optional_bf16 = name.startswith("[bf16_]")
        pattern = re.sub(r"[A-Z]{2,}|\d+", r"\\d+", re.escape(name.removeprefix("[bf16_]")))
        patterns.append(re.compile(("(?:bf16_)?" if optional_bf16 else "") + pattern))
    return patterns


@pytest.mark.multiproc
def test_the_format_readme_names_every_file_of_every_checkpoint(trained):
    """The one description of the checkpoint tree covers what training (ZeRO 0-3, TP, PP, fp32 and
    bf16: DeepSpeed's files included) and the converter really write."""
    patterns = _documented_names()
    checkpoints = sorted(p for p in trained.iterdir() if (p / "latest").is_file())
    assert len(checkpoints) >= 10
    for ckpt in checkpoints:
        for path in ckpt.rglob("*"):
            for part in path.relative_to(ckpt).parts:
                assert any(pat.fullmatch(part) for pat in patterns), (
                    f"{path.relative_to(trained)}: {part} is not in the README"
                )


# --------------------------------------------------------------------------------------------------
# Mixed precision: the fp32 master weights, checked against DeepSpeed's own zero_to_fp32
# --------------------------------------------------------------------------------------------------
def _deepspeed_fp32(ckpt):
    """DeepSpeed's reconstruction of the fp32 master weights from its optimizer-state files (the oracle)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _check_master_and_copies(ckpt):
    """Our master files: fp32, read by default (and said so); the bf16 rank files are their rounding and
    differ from them. Returns (manifest, master states)."""
    m, master = _files(ckpt)
    assert m["dtype"] == "bf16" and m["fp32_master"] == "fp32_master" and m["weights_read"] == "fp32_master"
    assert "fp32 master" in m["weights_read_text"]
    m_model, copies = read_model_files(resolve_model_dir(ckpt), weights="model")
    assert m_model["weights_read"] == "model" and sorted(copies) == sorted(master)
    largest = 0.0
    for rank in master:
        for k, v in master[rank].items():
            assert v.dtype == torch.float32 and copies[rank][k].dtype == torch.bfloat16, (rank, k)
            assert torch.equal(v.to(torch.bfloat16), copies[rank][k]), (rank, k)
            largest = max(largest, float((v - copies[rank][k].float()).abs().max()))
    assert largest > 0  # the bf16 copies are not the trained weights
    return m, master


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["bf16_z1", "bf16_z3"])
def test_bf16_checkpoint_holds_deepspeeds_fp32_master_weights(trained, tmp_path, name):
    _, master = _check_master_and_copies(trained / name)
    oracle = _deepspeed_fp32(trained / name)
    sd = master[(0, 0)]
    assert set(oracle) == {k for k in sd if not k.endswith("_extra_state")}, sorted(set(oracle) ^ set(sd))[:4]
    for k, v in oracle.items():
        assert torch.equal(sd[k], v.float()), k
    # to-hf (default fp32) exports exactly the master weights, and says it read them
    r = run_tool("convert_checkpoint", "to-hf", trained / name, "--output-dir", tmp_path / "hf", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "reading the fp32 master weights" in r.stdout
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(hf["model.decoder.layers.1.fc1.weight"], oracle["decoder.layers.1.mlp.linear_fc1.weight"])
    assert torch.equal(hf["model.decoder.embed_tokens.weight"], oracle["embedding.word_embeddings.weight"][:256])


@pytest.mark.multiproc
def test_init_from_loads_the_fp32_master_weights(trained):
    loaded = load_file(str(trained / "init_from_bf16_z1.safetensors"))  # an fp32 model after init_from's loader
    oracle = _deepspeed_fp32(trained / "bf16_z1")
    for k, v in oracle.items():
        assert torch.equal(loaded[k], v.float()), k


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["bf16_tp2", "bf16_pp2"])
def test_reshard_of_tp_pp_bf16_checkpoints_reads_the_master_weights(trained, tmp_path, name):
    m, master = _check_master_and_copies(trained / name)
    one = reshard(trained / name, tmp_path / "one", tp=1, pp=1)
    m1, merged = _files(one)
    assert m1["dtype"] == "fp32" and m1["weights_read"] == "model"  # a reshard writes the master weights as fp32
    back = _files(reshard(one, tmp_path / "back", tp=m["tp"], pp=m["pp"]))[1]
    if m["pp"] > 1:  # the last stage's tied LM-head copy is taken from the embedding (merge_ranks)
        last = (0, m["pp"] - 1)
        assert torch.equal(back[last]["output_layer.weight"], master[(0, 0)]["embedding.word_embeddings.weight"])
        back[last]["output_layer.weight"] = master[last]["output_layer.weight"]
    _assert_same(back, master)


# --------------------------------------------------------------------------------------------------
# OPT-350m's shape (post-LN, 32-wide embeddings projected to the 64-wide model): training, conversion, export
# --------------------------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_opt_350m_zero_to_fp32_script_in_the_checkpoint_matches_our_master_weights(trained, tmp_path):
    """DeepSpeed's own zero_to_fp32.py, which DeepSpeed copies into every checkpoint directory, run the
    way a user runs it, reconstructs exactly our fp32 master files (and the layout holds project_in/out)."""
    ckpt = trained / "opt_350m_bf16_z1"
    script = ckpt / "zero_to_fp32.py"
    assert script.is_file()
    r = run(
        [sys.executable, str(script), str(ckpt), str(tmp_path / "fp32"), "--safe_serialization"],
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    files = sorted((tmp_path / "fp32").glob("*.safetensors"))
    assert files, sorted(p.name for p in (tmp_path / "fp32").iterdir())
    theirs = {}
    for f in files:
        theirs.update({k.removeprefix("module."): v for k, v in load_file(str(f)).items()})
    _, master = _check_master_and_copies(ckpt)
    ours = master[(0, 0)]
    assert ours["embedding.word_embeddings.weight"].shape == (256, 32)
    assert ours["embedding.word_embeddings.project_in.weight"].shape == (64, 32)
    assert ours["output_layer.project_out.weight"].shape == (32, 64)
    assert "decoder.layers.1.post_mlp_layernorm.weight" in ours and "decoder.final_layernorm.weight" not in ours
    assert set(theirs) == set(ours), sorted(set(theirs) ^ set(ours))[:4]
    for k in ours:
        assert theirs[k].dtype == torch.float32 and torch.equal(theirs[k], ours[k]), k


@pytest.mark.multiproc
def test_opt_350m_trained_checkpoint_to_hf_and_fp16_w8a8_export(trained, tmp_path):
    """to-hf (CLI) of the trained bf16 ZeRO-1 checkpoint reproduces megatron's logits in transformers
    (remote code: learnable offsets + gates); tools/export_fp16_w8a8.py writes reloadable fp16 and W8A8 models."""
    from transformers import AutoModelForCausalLM

    tok = tmp_path / "tok"
    evallib.write_tokenizer(tok)
    r = run_tool(
        "convert_checkpoint",
        "to-hf",
        trained / "opt_350m_bf16_z1",
        "--output-dir",
        tmp_path / "hf",
        "--tokenizer",
        tok,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["do_layer_norm_before"], cfg["word_embed_proj_dim"], cfg["hidden_size"]) == (False, 32, 64)
    ref = load_file(str(trained / "opt_350m_logits.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    want = ref["logits"][..., : logits.shape[-1]]
    assert (logits - want).abs().max() <= 64 * torch.finfo(torch.float32).eps * float(want.abs().max())

    calib = evallib.write_corpus(tmp_path / "calib.jsonl", 20, seed=3)
    r = run(evallib.export_cmd(tmp_path / "hf", tmp_path / "exp", calib), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ids = ref["tokens"][:, :8] % 90  # ids inside the word-level tokenizer's vocabulary
    fp16 = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "exp" / "fp16"), trust_remote_code=True, dtype="auto"
    ).eval()
    assert fp16.model.decoder.project_in.weight.dtype == torch.float16
    w8 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exp" / "w8a8"), trust_remote_code=True).eval()
    assert w8.model.decoder.layers[0].fc1.quantization_scheme is not None
    with torch.no_grad():
        flt, half, q = model(ids).logits, fp16(ids).logits.float(), w8(ids).logits
    scale = float(flt.abs().max())
    # fp16 weights + fp16 compute over 2 layers: a few fp16 ulps (2^-10) of the logit magnitude
    assert (half - flt).abs().max() <= 16 * 2.0**-10 * scale
    assert torch.isfinite(q).all() and 0 < float((q - flt).abs().max()) <= 0.5 * scale


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["opt_350m_tp2", "opt_350m_pp2"])
def test_opt_350m_tp2_pp2_training_checkpoints_convert(trained, tmp_path, name):
    """TP=2 / PP=2 training of the 350m shape runs (finite losses), its checkpoints reshard to TP=1 and
    back identically, and to-hf gives the same Hugging Face tensors from either layout."""
    results = json.loads((trained / "results.json").read_text())
    assert all(math.isfinite(x) for x in results[name]) and len(results[name]) == 4
    m, states = _files(trained / name)
    last = (0, m["pp"] - 1)
    assert (
        "output_layer.project_out.weight" in states[last]
        and "embedding.word_embeddings.project_in.weight" in states[(0, 0)]
    )
    one = reshard(trained / name, tmp_path / "one", tp=1, pp=1)
    back = _files(reshard(one, tmp_path / "back", tp=m["tp"], pp=m["pp"]))[1]
    if m["pp"] > 1:  # the last stage's tied head copy comes from the embedding (merge_ranks)
        back[last]["output_layer.weight"] = states[last]["output_layer.weight"]
    _assert_same(back, states)
    a = load_file(str(to_hf(trained / name, tmp_path / "hf_a") / "model.safetensors"))
    b = load_file(str(to_hf(one, tmp_path / "hf_b") / "model.safetensors"))
    assert sorted(a) == sorted(b) and "model.decoder.project_out.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("layer_norm_elementwise_affine", False, "layer_norm_elementwise_affine=False: expected True"),
        ("_remove_final_layer_norm", True, "_remove_final_layer_norm=True: expected False"),
        ("activation_function", "silu", "activation='silu': expected one of"),
        ("word_embed_proj_dim", 0, "word_embed_proj_dim=0: expected a positive integer"),
    ],
)
def test_opt_350m_unsupported_hf_variant_is_one_line_and_writes_nothing(tmp_path, key, value, expected):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    src = tmp_path / "opt"
    # OPT-350m's shape (post-LN, 32-wide embeddings) on the tiny model of the export tests
    opt350m = dict(evallib.TINY, vocab_size=250, do_layer_norm_before=False, word_embed_proj_dim=32, dropout=0.1)
    OPTForCausalLM(OPTConfig(**opt350m)).save_pretrained(str(src))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
    r = run_tool(
        "convert_checkpoint", "from-hf", src, "--output-dir", tmp_path / "out", "--tp", 1, "--pp", 1, timeout=120
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and expected in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["opt"]
