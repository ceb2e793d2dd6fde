"""Single-process training runs inside the test process: TensorBoard tags, exact resume, directory
ownership, LR schedule and optimizer groups."""

import json
import math

import pytest
from train_testlib import BASE, DEMO, indexed_sets, sentencepiece_corpus, tensorboard_scalars

from megatron_outeff.errors import OutEffError
from megatron_outeff.training.config import load_config
from megatron_outeff.training.train import train


def test_loss_curve_is_finite_and_moves(oracle):
    losses = oracle["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(256)) < 0.2  # random init predicts ~uniformly


def test_tensorboard_tags(oracle):
    scalars = tensorboard_scalars(oracle["tensorboard_dir"])
    tags = set(scalars)
    for base in ("lm loss", "learning-rate", "grad-norm", "lm loss validation", "lm loss validation ppl"):
        for suffix in ("", " vs samples", " vs tokens"):
            assert base + suffix in tags, base + suffix
    assert {"iteration-time", "throughput/tokens_per_sec"} <= tags
    assert "loss-scale" not in tags  # fp32: no loss scaler
    steps = {tag: [s for s, _ in events] for tag, events in scalars.items()}
    assert steps["lm loss"] == [1, 2, 3, 4]
    assert [v for _, v in scalars["lm loss"]] == pytest.approx(oracle["losses"], rel=1e-6)
    assert steps["lm loss vs samples"] == [4, 8, 12, 16]
    assert steps["lm loss vs tokens"] == [128, 256, 384, 512]
    assert steps["lm loss validation"] == [2, 4]
    # outlier metrics every 2 steps: per component (global layer index) and the paper's aggregates
    for i in (0, 1):
        for kind in ("attn_ln", "attn_out", "ffn_ln", "fc2", "layer"):
            for stat in ("inf_norm", "kurtosis"):
                assert f"outliers/layer{i}/{kind}/{stat}" in tags
    for agg in ("max_inf_norm", "max_layer_inf_norm", "max_ffn_inf_norm", "avg_kurtosis", "max_kurtosis"):
        assert steps[f"outliers/{agg}"] == [2, 4]
    assert "outliers/final_ln/inf_norm" in tags
    assert scalars["outliers/max_layer_inf_norm"][0][1] > 0
    # attention mass (the demo config is Softmax_1: the sink takes a share of every row)
    for i in (0, 1):
        for stat in ("first_token_mass", "sink_mass"):
            assert steps[f"outliers/layer{i}/attn_probs/{stat}"] == [2, 4]
    sink = [v for _, v in scalars["outliers/mean_sink_mass"]]
    first = [v for _, v in scalars["outliers/mean_first_token_mass"]]
    assert all(0 < v < 1 for v in sink + first) and all(a + b < 1 for a, b in zip(sink, first))


def _resume_cfg(ckpt, extra=()):
    # dropout on: resuming must restore the RNG streams too, not only weights and optimizer
    return load_config(
        DEMO,
        BASE
        + [
            "train.train_iters=6",
            "train.clip_grad=1.0",
            "schedule.warmup_iters=2",
            "model.arch_overrides={vocab_size: 256, hidden_dropout: 0.1, attention_dropout: 0.1}",
            f"checkpoint.dir={ckpt or 'null'}",
            "checkpoint.keep_last=1",
            *extra,
        ],
    )


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    full = train(_resume_cfg(None))["history"]
    first = train(_resume_cfg(tmp_path / "ck", ["train.exit_interval=3"]))["history"]
    assert [i for i, _ in first] == [1, 2, 3]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "iter_0000003"
    second = train(_resume_cfg(tmp_path / "ck"))["history"]  # same config: resumes automatically
    assert [i for i, _ in second] == [4, 5, 6]
    assert [x for _, x in first + second] == pytest.approx([x for _, x in full], abs=1e-6)
    # keep_last=1: only the final checkpoint is left; the run directory is recorded
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["iter_0000006", "latest", "run.json"]
    state = json.loads((tmp_path / "ck" / "iter_0000006" / "train_state.json").read_text())
    assert state["iteration"] == 6 and state["data"]["consumed_samples"] == 24


def test_directory_of_another_run_is_refused(tmp_path):
    ck = tmp_path / "ck"
    (ck / "iter_0000002").mkdir(parents=True)  # another run's complete checkpoint
    (ck / "iter_0000002" / "train_state.json").write_text(json.dumps({"iteration": 2}))
    (ck / "latest").write_text("iter_0000002\n")
    run = ck / "run.json"
    run.write_text(json.dumps({"fingerprint": "0123456789abcdef"}))
    before = run.read_text()
    with pytest.raises(OutEffError, match="holds another run"):
        train(load_config(DEMO, BASE + [f"checkpoint.dir={ck}"]))
    assert run.read_text() == before and sorted(p.name for p in ck.iterdir()) == ["iter_0000002", "latest", "run.json"]
    (ck / "latest").unlink()  # a lost pointer does not make another run's checkpoints anyone's
    with pytest.raises(OutEffError, match="holds another run"):
        train(load_config(DEMO, BASE + [f"checkpoint.dir={ck}"]))
    assert run.read_text() == before and sorted(p.name for p in ck.iterdir()) == ["iter_0000002", "run.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.bin").write_text("x")
    with pytest.raises(OutEffError, match="not empty"):
        train(load_config(DEMO, BASE + [f"checkpoint.dir={tmp_path / 'other'}"]))
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["data.bin"]


def test_directory_without_a_complete_checkpoint_never_blocks(tmp_path):
    """A run that failed before its first checkpoint (another config, an interrupted save) leaves a
    directory that the next run takes over; --resume there is refused without writing anything."""
    ck = tmp_path / "ck"
    (ck / "iter_0000002.tmp").mkdir(parents=True)  # a save interrupted before its rename
    (ck / "run.json").write_text(json.dumps({"fingerprint": "0123456789abcdef"}))
    cfg = load_config(DEMO, BASE + ["train.train_iters=2", f"checkpoint.dir={ck}"])
    with pytest.raises(OutEffError, match="no complete checkpoint"):
        train(cfg, force_resume=True)
    assert json.loads((ck / "run.json").read_text())["fingerprint"] == "0123456789abcdef"
    assert [i for i, _ in train(cfg)["history"]] == [1, 2]
    assert json.loads((ck / "run.json").read_text())["fingerprint"] == cfg.fingerprint()
    assert (ck / "latest").read_text().strip() == "iter_0000002"


def test_lr_schedule():
    import torch

    from megatron_outeff.training.optimizer import WarmupDecayLR

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lin = WarmupDecayLR(opt, max_lr=1.0, min_lr=0.1, warmup_iters=2, decay_iters=6, decay_style="linear")
    assert [lin.get_lr(k) for k in range(8)] == pytest.approx([0, 0.5, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1])
    cos = WarmupDecayLR(opt, max_lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=4, decay_style="cosine")
    assert [cos.get_lr(k) for k in range(5)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6)
    lin.step()
    lin.step()
    assert opt.param_groups[0]["lr"] == 1.0 and lin.state_dict() == {"num_steps": 2}


# Oracle for the weight-decay rule: every parameter name the OPT model can hold (layer index and
# wrapper prefixes dropped), with its role written out by hand. A parameter missing here fails the test.
ROLES = {
    "embedding.word_embeddings.weight": "matrix",
    "embedding.position_embeddings.weight": "matrix",
    "input_layernorm.weight": "norm",
    "input_layernorm.bias": "bias",
    "pre_mlp_layernorm.weight": "norm",
    "pre_mlp_layernorm.bias": "bias",
    "final_layernorm.weight": "norm",
    "final_layernorm.bias": "bias",
    "self_attention.linear_qkv.weight": "matrix",
    "self_attention.linear_qkv.bias": "bias",
    "self_attention.linear_proj.weight": "matrix",
    "self_attention.linear_proj.bias": "bias",
    "mlp.linear_fc1.weight": "matrix",
    "mlp.linear_fc1.bias": "bias",
    "mlp.linear_fc2.weight": "matrix",
    "mlp.linear_fc2.bias": "bias",
    "self_attention.core_attention.softmax_offset": "vector",  # learnable per-head offset, 1-D
    "self_attention.head_gate.weight": "matrix",
    "self_attention.head_gate.bias": "bias",  # linear / shared_linear
    "self_attention.head_gate.fc1_weight": "matrix",
    "self_attention.head_gate.fc1_bias": "bias",  # mlp gate, 2-D bias
    "self_attention.head_gate.fc2_weight": "matrix",
}
VARIANTS = [
    "{softmax: vanilla}",
    "{softmax: softmax1}",
    "{softmax: softmax_n, softmax_n: 2.0}",
    "{softmax: learnable}",
    "{softmax: softmax1, clip_alpha: 4.0}",
    "{softmax: softmax1, gate: linear}",
    "{softmax: vanilla, gate: mlp}",
    "{softmax: learnable, gate: shared_linear}",
    "{softmax: learnable, gate: elementwise}",
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("decay_norm", [True, False], ids=["decay_norm", "megatron"])
def test_weight_decay_by_parameter_role(variant, decay_norm):
    """Every parameter of a real built model lands in the group its role says (biases of any shape and
    1-D parameters never decayed, LayerNorm weights iff decay_norm_weights), and one AdamW step with
    zero gradients moves exactly the decayed ones, by the factor 1 - lr * weight_decay."""
    import re

    import torch

    from megatron_outeff.megatron.parallel import init_model_parallel
    from megatron_outeff.training.model import build_model
    from megatron_outeff.training.optimizer import param_groups

    init_model_parallel(1, 1, 1)
    cfg = load_config(DEMO, BASE + [f"attention={variant}", f"optimizer.decay_norm_weights={str(decay_norm).lower()}"])
    model = build_model(cfg)
    names = {id(p): re.sub(r"^(module\.)*|decoder\.(layers\.\d+\.)?", "", n) for n, p in model.named_parameters()}
    groups = param_groups(model, cfg)
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())  # every parameter exactly once
    unknown = set(grouped) - set(ROLES)
    assert not unknown, f"parameters without a role in the oracle: {unknown}"
    decayed_roles = {"matrix", "norm"} if decay_norm else {"matrix"}
    for g in groups:
        for p in g["params"]:
            want = cfg.optimizer.weight_decay if ROLES[names[id(p)]] in decayed_roles else 0.0
            assert g["weight_decay"] == want, (names[id(p)], g["name"])
    # megatron-core's rule (no decay for '*.bias' and 1-D parameters) holds wherever it applies
    for n, p in model.named_parameters():
        if (n.endswith(".bias") or p.dim() == 1) and ROLES[names[id(p)]] != "norm":
            assert not any(p is q for g in groups if g["weight_decay"] for q in g["params"]), n
    # the groups drive the optimizer: zero gradients, so AdamW's only change is the decoupled decay
    lr = 0.5
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.optim.AdamW(groups, lr=lr).step()
    for p in model.parameters():
        factor = 1.0 - lr * cfg.optimizer.weight_decay if ROLES[names[id(p)]] in decayed_roles else 1.0
        # one float32 multiply per element: within one rounding of the exact product
        torch.testing.assert_close(p.detach(), before[id(p)] * factor, rtol=torch.finfo(torch.float32).eps, atol=0)


def test_indexed_dataset_source(tmp_path):
    """data.source=indexed: megatron GPTDatasets built from a preprocessed corpus; resumes exactly."""
    from megatron_outeff.data.preprocess import preprocess_corpus

    corpus = tmp_path / "corpus.jsonl"
    tok = sentencepiece_corpus(corpus, tmp_path / "spm")
    prefix = str(tmp_path / "idx" / "corpus")
    preprocess_corpus(str(corpus), prefix, tok, progress=False)

    def cfg(ck, extra=()):
        sets = indexed_sets({"tokenizer": tok}, f"[{prefix}]", "data.split=90,10,0", "train.train_iters=4")
        return load_config(
            DEMO,
            BASE + sets + ["train.eval_interval=2", "train.eval_iters=1", f"checkpoint.dir={ck or 'null'}", *extra],
        )

    full = train(cfg(None))["history"]
    assert all(math.isfinite(x) for _, x in full) and abs(full[0][1] - math.log(304)) < 0.3
    first = train(cfg(tmp_path / "ck", ["train.exit_interval=2"]))["history"]
    second = train(cfg(tmp_path / "ck"))["history"]
    assert [x for _, x in first + second] == pytest.approx([x for _, x in full], abs=1e-6)


def test_resume_flag_continues_with_a_changed_config(tmp_path):
    ck = tmp_path / "ck"
    train(load_config(DEMO, BASE + ["train.train_iters=2", f"checkpoint.dir={ck}"]))
    longer = load_config(DEMO, BASE + ["train.train_iters=3", f"checkpoint.dir={ck}"])
    with pytest.raises(OutEffError, match="holds another run"):
        train(longer)
    assert (ck / "latest").read_text().strip() == "iter_0000002"
    assert [i for i, _ in train(longer, force_resume=True)["history"]] == [3]
    assert json.loads((ck / "run.json").read_text())["fingerprint"] == longer.fingerprint()
