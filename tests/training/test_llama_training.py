"""A tiny Llama end to end (issue 23's "done when"): trains under TP=2 (Softmax_1 + per-head gates, and
Softmax_1 + the elementwise gate) and PP=2 (vanilla), stopped after 2 steps and resumed, at the single-process loss curve; TP=2 + SP under
ZeRO-2, ZeRO-3 and a resume from TP=2 at PP=2 too; converts to our remote code and to a plain transformers LlamaForCausalLM whose
logits match our megatron model's; the FP16 and W8A8 exports reload; the int8 CPU path and the outlier
report run on it; TensorBoard carries OPT's tags. One torchrun launch (llama_worker.py)."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerance import assert_close_bound, network_depth, rounding_bound
from train_testlib import ROOT, TORCHRUN, env, free_port, tensorboard_scalars

pytestmark = pytest.mark.multiproc
WORKER = str(Path(__file__).with_name("llama_worker.py"))
TOL = 1e-5  # the layouts' loss tolerance against the single-process curve (test_multiproc.py)
# llama-tiny (hidden 64, SwiGLU 176, 2 layers) at 16 tokens, vocabulary 256: tests/tolerance.py
DEPTH = network_depth(dict(hidden_size=64, ffn_dim=2 * 176, num_hidden_layers=2, max_position_embeddings=16)) + 256


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), WORKER, str(out)]
    r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The two checkpoints as Hugging Face directories (convert.to_hf: what tools/convert_checkpoint.py runs)."""
    from megatron_outeff.convert import to_hf

    out = tmp_path_factory.mktemp("llama_hf")
    return {name: to_hf(trained / name, out / name) for name in ("tp2", "pp2", "tp2_elementwise")}


@pytest.mark.parametrize(
    "name, ref",
    [
        ("tp2", "ref_gated"),
        ("pp2", "ref_vanilla"),
        ("tp2_sp_zero2", "ref_gated"),
        ("dp2_zero3", "ref_gated"),
        ("tp2_elementwise", "ref_elementwise"),
    ],
)
def test_layouts_and_resumes_follow_the_single_process_curve(trained, name, ref):
    losses = json.loads((trained / "losses.json").read_text())
    assert len(losses[ref]) == 4 and losses[name] == pytest.approx(losses[ref], abs=TOL), losses
    if name in ("tp2", "pp2"):  # stopped at 2, resumed from the checkpoint to 4
        assert (trained / name / "latest").read_text().strip() == "iter_0000004"


def test_bf16_follows_the_fp32_curve(trained):
    losses = json.loads((trained / "losses.json").read_text())
    assert losses["tp2_bf16"] == pytest.approx(losses["ref_gated"], abs=5e-3), losses  # as the OPT bf16 layouts


def test_resume_on_another_layout(trained):
    """Elastic: the TP=2 checkpoint of step 2 resumed at PP=2 (weights, Adam moments, schedule merged and
    re-split for the new layout) continues the single-process curve (float32 rounding only: the sums of
    the new layout run in another order; training/README.md "Resume on another layout")."""
    losses = json.loads((trained / "losses.json").read_text())
    assert losses["tp2_to_pp2"] == pytest.approx(losses["ref_gated"][2:], abs=TOL), losses


def test_the_variant_changes_the_curve(trained):
    losses = json.loads((trained / "losses.json").read_text())
    assert abs(losses["ref_gated"][-1] - losses["ref_vanilla"][-1]) > 1e-4
    assert abs(losses["ref_elementwise"][-1] - losses["ref_vanilla"][-1]) > 1e-4


@pytest.mark.parametrize(
    "name, model_type, cls",
    [
        ("tp2", "outeff_llama", "OutEffLlamaForCausalLM"),
        ("pp2", "llama", "LlamaForCausalLM"),
        ("tp2_elementwise", "outeff_llama", "OutEffLlamaForCausalLM"),
    ],
)
def test_exports_load_in_transformers_and_match_megatron(trained, exported, name, model_type, cls):
    from transformers import AutoModelForCausalLM

    hf_dir = exported[name]
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == model_type and cfg["num_key_value_heads"] == 2
    assert (sorted(p.name for p in hf_dir.glob("*.py")) == []) == (name == "pp2")  # vanilla: no remote code
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=name != "pp2").eval()
    assert type(model).__name__ == cls
    ref = load_file(str(trained / "megatron_logits.safetensors"))
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    want = ref[name][..., : logits.shape[-1]]
    assert_close_bound(logits, want, rounding_bound(torch.float32, want.abs().max(), DEPTH), f"{name}: HF vs megatron")


@pytest.mark.parametrize("name, linears", [("tp2", 7), ("tp2_elementwise", 8)])
def test_fp16_and_w8a8_exports_reload_and_the_int8_path_runs(exported, tmp_path, name, linears):
    """export_fp16 / export_w8a8 (tools/export_fp16_w8a8.py's library) on the gated Llamas: the W8A8 directory
    reloads with transformers + compressed-tensors and gives our simulation of its Linears bit for bit (per
    layer q, k, v, o, gate, up, down, and the elementwise gate's gate_proj; the LM head stays float); the int8
    CPU path (Int8Linear in every calibrated Linear) stays near the float model."""
    from transformers import AutoModelForCausalLM

    from megatron_outeff.evaluation.quant_eval import load_hf_model
    from megatron_outeff.quant.compressed_tensors_export import simulate_w8a8_model
    from megatron_outeff.quant.export import export_fp16, export_w8a8
    from megatron_outeff.quant.int8_linear import Int8Linear, cpu_has_vnni, int8_model

    model = load_hf_model(exported[name])
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)]
    export_fp16(model, exported[name], batches, tmp_path / "fp16")
    half = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp16"), trust_remote_code=True)
    assert half.dtype == torch.float16 and type(half).__name__ == "OutEffLlamaForCausalLM"
    params = export_w8a8(model, exported[name], batches, tmp_path / "w8a8")
    assert len(params) == linears * 2
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "w8a8"), trust_remote_code=True).eval()
    ids = torch.randint(0, 256, (2, 16), generator=g)
    with torch.no_grad():
        got, want = reloaded(ids).logits, simulate_w8a8_model(model, params)(ids).logits
        flt = model(ids).logits
        q = int8_model(model, params, reduce_range=not cpu_has_vnni())
        y = q(ids).logits
    assert torch.equal(got, want)
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == len(params)
    assert torch.isfinite(y).all() and ((y - flt).norm() / flt.norm()).item() < 0.1


def test_outlier_report_and_simulated_w8a8_cover_the_llama_ops(exported):
    from megatron_outeff.evaluation.quant_eval import load_hf_model, simulated_w8a8_perplexity
    from megatron_outeff.evaluation.report import ReportSettings, collect_model_stats

    blocks = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(4))
    stats = {}
    for name in ("tp2", "pp2"):
        model = load_hf_model(exported[name])
        stats[name] = collect_model_stats(model, blocks, ReportSettings(batch_size=2))
        agg = stats[name]["aggregates"]
        numbers = [v for v in agg.values() if isinstance(v, (int, float))]
        assert len(stats[name]["layers"]) == 2 and len(numbers) >= 8 and all(math.isfinite(v) for v in numbers), agg
        assert set(stats[name]["first_token_norm_sources"]) >= {"embed_tokens", "layer0.attn_out", "layer1.fc2"}
        sim = simulated_w8a8_perplexity(model, blocks, [blocks[:2]], batch_size=2)
        # like for like: the plain export goes through our remote code with vanilla softmax. Per layer 7 Linears,
        # 2 RMSNorms, 5 QuantPoints; plus the embedding and the final RMSNorm (the LM head stays float).
        assert sim["quantized_activations"] == 2 * (7 + 2 + 5) + 2 and sim["quant_points"] == 10, sim
    assert stats["tp2"]["aggregates"]["mean_sink_mass"] > 0 and stats["pp2"]["aggregates"]["mean_sink_mass"] == 0


def test_tensorboard_carries_the_opt_tags(trained):
    tags = tensorboard_scalars(trained / "tb_tp2")
    for tag in (
        "lm loss",
        "learning-rate",
        "grad-norm",
        "lm loss vs samples",
        "outliers/max_inf_norm",
        "outliers/layer1/attn_probs/sink_mass",
        "outliers/layer0/fc2/kurtosis",
        "outliers/final_ln/inf_norm",
    ):
        assert tag in tags, sorted(tags)
    assert [s for s, _ in tags["lm loss"]] == [1, 2, 3, 4]  # the resumed run continued the same series
