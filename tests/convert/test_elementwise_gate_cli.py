"""The elementwise output gate end to end, through the command-line tools a user runs (issue 22 item 2):

1. ``python -m megatron_outeff.training.train`` with ``attention.gate: elementwise`` (+ learnable offsets and
   the clipped softmax) trains 2 of 4 steps on one process (ZeRO-1; outlier metrics every step) and stops;
2. ``torchrun --nproc_per_node 2 -m megatron_outeff.training.train`` resumes it at TP=2 (another layout)
   and finishes: its losses follow an uninterrupted single-process run of the same config;
3. ``tools/convert_checkpoint.py to-hf`` exports it (remote code; the exporter's own reload, cached
   generation and padded-batch checks run); transformers reproduces megatron's logits;
4. ``tools/convert_checkpoint.py from-hf`` brings it back at TP=2: the model files equal ``reshard``'s;
5. ``tools/export_fp16_w8a8.py`` writes fp16 and compressed-tensors W8A8, the gate's Linear quantized too;
6. megatron-core's own ``attention_output_gate`` through ``model.transformer_overrides`` is refused: one line,
   exit code 2, naming ``attention.gate: elementwise``.
"""

import json

import evallib
import pytest
import torch
from tolerance import assert_close_bound, network_depth, rounding_bound
from train_testlib import (
    BASE,
    DEMO,
    assert_exit_0,
    megatron_model_tp1,
    run,
    run_tool,
    tensorboard_scalars,
    torchrun_launcher,
    train_cmd,
)

VARIANT = "attention={softmax: learnable, gate: elementwise, clip_gamma: -0.02}"
RUN = BASE + [VARIANT, "parallel.zero_stage=1", "logging.outlier_interval=1"]
DEPTH = network_depth(dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, max_position_embeddings=32)) + 256


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Steps 1-2: the interrupted run (1 process, then TP=2) and, in this process, the uninterrupted one."""
    out = tmp_path_factory.mktemp("elementwise")
    ck, tb = out / "ckpt", out / "tb"
    logs = [f"checkpoint.dir={ck}", f"logging.tensorboard_dir={tb}"]
    assert_exit_0(run(train_cmd(RUN + ["train.exit_interval=2", *logs]), timeout=600))
    assert_exit_0(run(train_cmd(RUN + ["parallel.tensor_parallel=2", *logs], torchrun_launcher()), timeout=600))

    from megatron_outeff.training.config import load_config
    from megatron_outeff.training.train import train as train_in_process

    reference = [loss for _, loss in train_in_process(load_config(DEMO, RUN + ["checkpoint.dir=null"]))["history"]]
    return out, ck, tb, reference


@pytest.mark.multiproc
def test_trains_and_resumes_at_tp2_following_the_uninterrupted_run(workdir):
    out, ck, tb, reference = workdir
    assert (ck / "latest").read_text().strip() == "iter_0000004"
    manifest = json.loads((ck / "iter_0000004" / "model" / "manifest.json").read_text())
    assert manifest["tp"] == 2 and manifest["attention"]["gate"] == "elementwise"
    scalars = tensorboard_scalars(tb)
    losses = [v for _, v in sorted(scalars["lm loss"])]
    assert len(losses) == len(reference) == 4
    # steps 1-2 on the same layout: the same computation; 3-4 after the TP=2 resume: the TP partial sums and the
    # moments' merge change the rounding only (float32, the network's rounding chain, tests/tolerance.py)
    assert losses[:2] == pytest.approx(reference[:2], rel=0, abs=rounding_bound(torch.float32, max(reference), DEPTH))
    assert_close_bound(
        torch.tensor(losses[2:]),
        torch.tensor(reference[2:]),
        rounding_bound(torch.float32, max(reference), 4 * DEPTH),
        "resumed losses",
    )
    # the gate trains: its rows (merged from the TP=1 and the TP=2 checkpoints) moved between steps 2 and 4
    from megatron_outeff.checkpoint_format import manifest_arch_variant, merge_ranks, read_model_files

    gates = []
    for tag in ("iter_0000002", "iter_0000004"):
        m, states = read_model_files(ck / tag / "model")
        arch, variant = manifest_arch_variant(m)
        gates.append(merge_ranks(states, arch, variant)[0]["model.decoder.layers.0.self_attn.gate_proj.weight"])
    assert not torch.equal(gates[0], gates[1])
    # the outlier metrics ran with the gate on both layouts
    assert len(scalars["outliers/max_layer_inf_norm"]) == 4 and "outliers/mean_sink_mass" in scalars


@pytest.mark.multiproc
def test_converts_to_hugging_face_and_back_and_exports_w8a8(workdir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_outeff.checkpoint_format import read_model_files, resolve_model_dir

    out, ck, _, _ = workdir
    tok = out / "tok"
    evallib.write_tokenizer(tok)
    hf = out / "hf"
    assert_exit_0(run_tool("convert_checkpoint", "to-hf", ck, "--output-dir", hf, "--tokenizer", tok), 2000)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "outeff_opt" and cfg["gate"] == "elementwise" and cfg["softmax"] == "learnable"
    weights = load_file(str(hf / "model.safetensors"))
    assert weights["model.decoder.layers.1.self_attn.gate_proj.weight"].shape == (64, 64)

    # transformers (remote code) against megatron at TP=1 on the same weights
    from megatron_outeff.megatron.parallel import init_model_parallel
    from megatron_outeff.training.config import load_config

    init_model_parallel(1, 1, 1)
    cfg_run = load_config(DEMO, RUN)
    model = megatron_model_tp1(cfg_run, ck)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(ids, torch.arange(16).expand_as(ids), None)
        got = AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=True).eval()(ids).logits
    want = want[..., : got.shape[-1]]
    assert_close_bound(got, want, rounding_bound(torch.float32, want.abs().max(), DEPTH), "HF vs megatron logits")

    # and back: from-hf at TP=2 gives exactly the tensors reshard writes from the training checkpoint
    assert_exit_0(
        run_tool("convert_checkpoint", "from-hf", hf, "--output-dir", out / "back", "--tp", "2", "--pp", "1"), 2000
    )
    assert_exit_0(
        run_tool("convert_checkpoint", "reshard", ck, "--output-dir", out / "tp2", "--tp", "2", "--pp", "1"), 2000
    )
    back, direct = (read_model_files(resolve_model_dir(out / d))[1] for d in ("back", "tp2"))
    assert sorted(back) == sorted(direct) == [(0, 0), (1, 0)]
    for rank in back:
        assert sorted(back[rank]) == sorted(direct[rank])
        assert all(torch.equal(back[rank][k], direct[rank][k]) for k in back[rank]), rank

    # fp16 and W8A8 exports: the gate's Linear is quantized like q/k/v/out_proj
    calib = evallib.write_corpus(out / "calib.jsonl", 20, seed=3)
    assert_exit_0(run(evallib.export_cmd(hf, out / "exp", calib), timeout=600), 2000)
    w8 = AutoModelForCausalLM.from_pretrained(str(out / "exp" / "w8a8"), trust_remote_code=True).eval()
    attn = w8.model.decoder.layers[0].self_attn
    assert attn.gate_proj.quantization_scheme is not None and attn.q_proj.quantization_scheme is not None
    fp16 = AutoModelForCausalLM.from_pretrained(str(out / "exp" / "fp16"), trust_remote_code=True, dtype="auto").eval()
    assert fp16.model.decoder.layers[0].self_attn.gate_proj.weight.dtype == torch.float16
    small = ids[:, :8] % 90  # ids inside the word-level tokenizer's vocabulary
    with torch.no_grad():
        flt = AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=True).eval()(small).logits
        half, q = fp16(small).logits.float(), w8(small).logits
    scale = float(flt.abs().max())
    assert (half - flt).abs().max() <= 16 * 2.0**-10 * scale  # fp16 weights and compute over 2 layers
    assert torch.isfinite(q).all() and 0 < float((q - flt).abs().max()) <= 0.5 * scale


@pytest.mark.multiproc
def test_megatrons_output_gate_through_overrides_is_refused_in_one_line(tmp_path):
    overrides = ["model.transformer_overrides={attention_output_gate: true}", f"checkpoint.dir={tmp_path / 'c'}"]
    r = run(train_cmd(BASE + overrides), timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.transformer_overrides.attention_output_gate:")
    assert "use attention.gate: elementwise" in lines[0]
    assert not (tmp_path / "c").exists()
