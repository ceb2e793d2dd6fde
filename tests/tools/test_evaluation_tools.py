"""The evaluation tools (tools/export_fp16_w8a8.py, tools/outlier_report.py) on tiny random models, in-process.

Two models exported with export_hf_dir: a plain OPT whose final LayerNorm weight has channel 17 scaled
by 50 (a planted outlier: we KNOW which model and channel must show it) and a softmax1 OutEffOPT."""

import json
import math
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evallib  # noqa: E402

from megatron_outeff.evaluation.eval_data import calibration_batches, eval_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
export_main = runpy.run_path(str(ROOT / "tools" / "export_fp16_w8a8.py"))["main"]
report_main = runpy.run_path(str(ROOT / "tools" / "outlier_report.py"))["main"]

BLOCK, MAX_BLOCKS, BATCH = 16, 6, 4
DATA_ARGS = ["--block-size", str(BLOCK), "--num-calib-batches", "2", "--calib-batch-size", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaltools")
    models, tok_dir = evallib.build_models(str(root))
    valid = evallib.write_corpus(root / "valid.jsonl", 30, seed=1)
    train = evallib.write_corpus(root / "train.jsonl", 30, seed=2)
    report_dir = root / "report"
    rc = report_main(
        [
            "--model",
            f"vanilla={models['vanilla']}",
            "--model",
            f"sm1={models['sm1']}",
            "--data",
            valid,
            "--calib-data",
            train,
            "--output-dir",
            str(report_dir),
            "--max-blocks",
            str(MAX_BLOCKS),
            "--batch-size",
            str(BATCH),
            *DATA_ARGS,
        ]
    )
    assert rc == 0
    report = json.loads((report_dir / "report.json").read_text())
    return dict(root=root, models=models, tok=tok_dir, valid=valid, train=train, report_dir=report_dir, report=report)


def _load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw).eval()


def _by_hand(x):
    """Per-sample inf norm and Pearson kurtosis of [b, s, d] in plain torch (float64)."""
    rows = x.detach().double().reshape(x.shape[0], -1)
    inf = rows.abs().max(dim=1).values
    c = rows - rows.mean(dim=1, keepdim=True)
    var = (c**2).sum(dim=1) / (rows.shape[1] - 1)
    kurt = (c**4).mean(dim=1) / (var**2 + 1e-6)
    share = (c.abs() > 6.0 * var.sqrt()[:, None]).double().mean(dim=1)
    return inf, kurt, share


@pytest.mark.parametrize("label", ["vanilla", "sm1"])
def test_report_numbers_equal_direct_computation(env, label):
    blocks = eval_blocks(env["valid"], env["tok"], block_size=BLOCK, max_blocks=MAX_BLOCKS).blocks
    assert env["report"]["eval_data"]["blocks"] == blocks.shape[0] == MAX_BLOCKS
    model = _load(env["models"][label], attn_implementation="eager")
    n_layers = model.config.num_hidden_layers
    per = {f"layer{i}.layer": [] for i in range(n_layers)} | {"final_ln": []}
    first = [[] for _ in range(n_layers)]
    with torch.no_grad():
        for i in range(0, blocks.shape[0], BATCH):
            out = model(input_ids=blocks[i : i + BATCH], output_hidden_states=True, output_attentions=True)
            hs = out.hidden_states  # [embeddings, layer0 out, ..., final LN out]
            for li in range(n_layers - 1):
                per[f"layer{li}.layer"].append(hs[li + 1])
            per["final_ln"].append(hs[-1])
            if label == "vanilla":  # plain OPT returns the attention probabilities
                for li, a in enumerate(out.attentions):
                    first[li].append(a[..., 0].reshape(-1))
    rep = env["report"]["models"][label]
    comps = rep["components"]
    for name, xs in per.items():
        if not xs:
            continue
        vals = [_by_hand(x) for x in xs]
        inf = torch.cat([v[0] for v in vals]).mean().item()
        kurt = torch.cat([v[1] for v in vals]).mean().item()
        share = torch.cat([v[2] for v in vals]).mean().item()
        assert comps[name]["inf_norm"] == pytest.approx(inf, rel=1e-5), name
        assert comps[name]["kurtosis"] == pytest.approx(kurt, rel=1e-5), name
        assert comps[name]["outlier_share"] == pytest.approx(share, abs=1e-12), name
        chan = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).abs().amax(0)
        assert comps[name]["top_channels"][0] == int(chan.argmax()), name
    agg = rep["aggregates"]
    assert agg["max_inf_norm"] == pytest.approx(max(c["inf_norm"] for c in comps.values()))
    assert agg["max_layer_inf_norm"] == pytest.approx(max(r["layer"]["inf_norm"] for r in rep["layers"]))
    assert agg["avg_kurtosis"] == pytest.approx(sum(c["kurtosis"] for c in comps.values()) / len(comps))
    if label == "vanilla":
        for li in range(n_layers):
            assert rep["layers"][li]["first_token_mass"] == pytest.approx(
                torch.cat(first[li]).double().mean().item(), rel=1e-5
            )
            assert rep["layers"][li]["sink_mass"] == 0.0
    else:  # softmax1: rows sum to 1 - sink mass < 1, the sink takes a visible share
        assert rep["attention_source"].startswith("softmax_quant")
        assert all(0.0 < r["sink_mass"] < 1.0 for r in rep["layers"])


def test_planted_outlier_is_found(env):
    van, sm1 = env["report"]["models"]["vanilla"], env["report"]["models"]["sm1"]
    assert van["top_outlier_channels"][0]["channel"] == evallib.PLANT_CHANNEL
    assert van["top_outlier_channels"][0]["component"] == "final_ln"
    assert van["final_ln"]["top_channels"][0] == evallib.PLANT_CHANNEL
    assert van["aggregates"]["max_inf_norm"] > 3 * sm1["aggregates"]["max_inf_norm"]
    assert van["final_ln"]["kurtosis"] > 10 * sm1["final_ln"]["kurtosis"]
    md = (env["report_dir"] / "report.md").read_text()
    assert f"dim {evallib.PLANT_CHANNEL} (" in md


def test_report_files_and_contents(env):
    d = env["report_dir"]
    for name in ("report.json", "report.md", "inf_norm.png", "kurtosis.png", "ppl.png"):
        assert (d / name).stat().st_size > 0, name
    for name in ("inf_norm.png", "kurtosis.png", "ppl.png"):
        assert (d / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (d / "report.md").read_text()
    assert "| vanilla | sm1 |" in md and "## vanilla" in md and "## sm1" in md
    assert "**" in md  # best values in bold
    rep = env["report"]
    assert rep["command"][0].endswith("outlier_report.py") and "--data" in rep["command"]
    assert rep["versions"]["torch"] and rep["versions"]["transformers"] and rep["versions"]["compressed-tensors"]
    assert rep["eval_data"]["kind"] == "text" and rep["calibration_data"]["batches"] == 2
    for label in ("vanilla", "sm1"):
        ppl = rep["models"][label]["perplexity"]
        for k in ("fp32", "fp16", "w8a8_simulated", "w8a8_deployable"):
            assert math.isfinite(ppl[k]["ppl"]) and ppl[k]["tokens"] == MAX_BLOCKS * (BLOCK - 1), (label, k)
        assert ppl["w8a8_simulated"]["ppl"] != ppl["fp32"]["ppl"]
    # like-for-like: the plain-OPT vanilla export is quantized through OutEffOPT(vanilla), same op set
    for label in ("sm1", "vanilla"):
        sim = rep["models"][label]["perplexity"]["w8a8_simulated"]
        assert sim["quant_points"] == 2 * 5, label  # QK, softmax, PV, 2 residuals per layer
    assert (
        rep["models"]["vanilla"]["perplexity"]["w8a8_simulated"]["quantized_activations"]
        == rep["models"]["sm1"]["perplexity"]["w8a8_simulated"]["quantized_activations"]
    )


def test_export_writes_reloadable_fp16_and_w8a8(env, capsys):
    from megatron_outeff.hf import perplexity

    out = env["root"] / "export"
    rc = export_main([env["models"]["sm1"], "--output-dir", str(out), "--calib-data", env["train"], *DATA_ARGS])
    assert rc == 0
    log = capsys.readouterr().out
    assert "[1/4]" in log and "[4/4]" in log
    blocks = eval_blocks(env["valid"], env["tok"], block_size=BLOCK, max_blocks=MAX_BLOCKS).blocks
    fp32 = perplexity(_load(env["models"]["sm1"]), blocks)["ppl"]
    fp16 = _load(out / "fp16", dtype="auto")
    assert next(fp16.parameters()).dtype == torch.float16
    assert json.loads((out / "fp16" / "config.json").read_text())["dtype"] == "float16"
    assert (out / "fp16" / "tokenizer.json").is_file()
    assert abs(perplexity(fp16, blocks)["ppl"] / fp32 - 1) < 0.01
    cfg = json.loads((out / "w8a8" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "int-quantized"
    w8 = _load(out / "w8a8")
    assert w8.model.decoder.layers[0].fc1.quantization_scheme is not None  # compressed-tensors applied
    w8_ppl = perplexity(w8, blocks)["ppl"]
    assert math.isfinite(w8_ppl) and w8_ppl != fp32

    # A second run into the same (now non-empty) output is refused and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    rc = export_main([env["models"]["sm1"], "--output-dir", str(out), "--calib-data", env["train"], *DATA_ARGS])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "refusing to overwrite" in err and "\n" not in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_export_refuses_fp16_overflow(env, capsys, tmp_path):
    from megatron_outeff.hf import export_hf_dir

    opt, _ = evallib.random_weights({"softmax": "vanilla"}, seed=3)
    for i in (0, 1):  # weights stay below 65504, the residual stream reaches ~8e4
        opt[f"model.decoder.layers.{i}.fc2.bias"] = torch.full_like(opt[f"model.decoder.layers.{i}.fc2.bias"], 4e4)
    src = export_hf_dir(tmp_path / "big", opt, evallib.TINY, "vanilla", tokenizer_dir=env["tok"])
    rc = export_main([str(src), "--output-dir", str(tmp_path / "o"), "--calib-data", env["train"], *DATA_ARGS])
    err = capsys.readouterr().err.strip()
    # layer 0 adds 4e4 to the residual stream (fits), layer 1 another 4e4: its residual add overflows first
    assert (
        rc == 2 and err.startswith("error: fp16 refused: model.decoder.layers.1: aten.add") and "overflows fp16" in err
    )
    assert not (tmp_path / "o" / "fp16").exists() and not (tmp_path / "o" / "w8a8").exists()


def _large_qk(variant, seed=4):
    """The issue's construction: equal query and key projections with entries of std 20."""
    opt, extra = evallib.random_weights({"softmax": variant}, seed=seed)
    w = 20.0 * torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))
    for i in (0, 1):
        opt[f"model.decoder.layers.{i}.self_attn.q_proj.weight"] = w.clone()
        opt[f"model.decoder.layers.{i}.self_attn.k_proj.weight"] = w.clone()
    return opt, extra


@pytest.mark.parametrize("variant", ["vanilla", "softmax1"])
def test_export_refuses_overflowing_attention_scores(env, capsys, tmp_path, variant):
    from megatron_outeff.hf import export_hf_dir

    opt, extra = _large_qk(variant)
    src = export_hf_dir(tmp_path / "m", opt, evallib.TINY, variant, extra_state=extra or None, tokenizer_dir=env["tok"])
    ids = calibration_batches(env["train"], env["tok"], num_batches=1, batch_size=2, block_size=BLOCK).batches[0]
    # the premise, from transformers' own fp16 forward: the fp16 model gives nan logits
    half = _load(src, dtype=torch.float16, attn_implementation="eager")
    with torch.no_grad():
        assert torch.isnan(half(ids).logits).all()
    if variant == "vanilla":  # ... while every module output of the fp32 model fits fp16 (the old check passed)
        model, peak = _load(src), [0.0]

        def hook(_m, _i, out):
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    peak[0] = max(peak[0], float(t.abs().max()))

        handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n]
        with torch.no_grad():
            model(ids)
        for h in handles:
            h.remove()
        assert peak[0] < 65504
    capsys.readouterr()
    rc = export_main([str(src), "--output-dir", str(tmp_path / "o"), "--calib-data", env["train"], *DATA_ARGS])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith("error: fp16 refused: model.decoder.layers.0.self_attn: aten.")
    assert "overflows fp16" in err
    assert not (tmp_path / "o").exists()
    # the same weights with normal query/key projections export
    opt_ok, extra_ok = evallib.random_weights({"softmax": variant}, seed=4)
    from megatron_outeff.hf import fp16_overflow_check

    fine = export_hf_dir(tmp_path / "fine", opt_ok, evallib.TINY, variant, extra_state=extra_ok or None)
    assert fp16_overflow_check(_load(fine), [ids]) is None


BAD_INPUT_CASES = [
    (tool, case)
    for tool in ("report", "export")
    for case in ("missing_model", "not_a_model", "missing_data", "bad_label", "bad_option")
    if not (tool == "export" and case == "bad_label")
]  # export takes no labels


@pytest.mark.parametrize("tool,case", BAD_INPUT_CASES)
def test_bad_input_one_line_exit_2_nothing_written(env, capsys, tmp_path, case, tool):
    model = {"missing_model": str(tmp_path / "nope"), "not_a_model": env["tok"]}.get(case, env["models"]["sm1"])
    data = str(tmp_path / "missing.jsonl") if case == "missing_data" else env["valid"]
    out = tmp_path / "out"
    if tool == "report":
        spec = model if case == "bad_label" else f"m={model}"
        extra = ["--block-size", "x"] if case == "bad_option" else []
        rc = report_main(
            ["--model", spec, "--data", data, "--output-dir", str(out), "--skip-quant", *DATA_ARGS, *extra]
        )
    else:
        extra = ["--num-calib-batches", "0"] if case == "bad_option" else []
        rc = export_main([model, "--output-dir", str(out), "--calib-data", data, *DATA_ARGS, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err, err
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_indexed_dataset_gives_the_same_blocks_as_text(env, tmp_path):
    from megatron_outeff.data.preprocess import preprocess_corpus

    prefix = str(tmp_path / "valid")
    preprocess_corpus(env["valid"], prefix, os.path.join(env["tok"], "tokenizer.json"), progress=False)
    a = eval_blocks(prefix, env["tok"], block_size=BLOCK, max_blocks=MAX_BLOCKS, vocab_size=256)
    b = eval_blocks(env["valid"], env["tok"], block_size=BLOCK, max_blocks=MAX_BLOCKS, vocab_size=256)
    assert a.description["kind"] == "megatron_indexed" and torch.equal(a.blocks, b.blocks)
    c = calibration_batches(prefix, env["tok"], num_batches=3, batch_size=2, block_size=BLOCK)
    assert [tuple(x.shape) for x in c.batches] == [(2, BLOCK)] * 3
    with pytest.raises(ValueError, match="vocab size is 10"):
        eval_blocks(prefix, None, block_size=BLOCK, max_blocks=2, vocab_size=10)
    with pytest.raises(ValueError, match="fewer than one block"):
        eval_blocks(env["valid"], env["tok"], block_size=100000)


def test_default_block_size_follows_the_model():
    """No --block-size: the paper's 512, capped at the model's max_position_embeddings (a 32-position model
    runs 32-token blocks instead of failing); a given size is kept when it fits."""
    from megatron_outeff.evaluation.quant_eval import check_runnable

    assert check_runnable("m", {"max_position_embeddings": 32}) == 32
    assert check_runnable("m", {"max_position_embeddings": 2048}) == 512
    assert check_runnable("m", {}) == 512
    assert check_runnable("m", {"max_position_embeddings": 32}, 16) == 16


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("batch_size", 0, "expected a positive integer"),
        ("top_k", 2.5, "expected a positive integer"),
        ("top_k", True, "expected a positive integer"),
        ("n_sigma", -1.0, "expected a finite number > 0"),
        ("n_sigma", float("nan"), "expected a finite number > 0"),
        ("n_sigma", "6", "expected a finite number > 0"),
        ("skip_quant", 1, "expected true or false"),
    ],
)
def test_report_settings_refuse_bad_values_from_the_library_too(field, value, expected):
    """The command line checks its options; a library caller of build_report gets the same one-line refusal."""
    from megatron_outeff.errors import OutEffError
    from megatron_outeff.evaluation.report import ReportSettings

    with pytest.raises(OutEffError) as e:
        ReportSettings(**{field: value})
    assert str(e.value) == f"ReportSettings.{field}={value!r}: {expected}"
