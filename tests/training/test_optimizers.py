"""optimizer.type through the real training stack (megatron-core model, DeepSpeed engine, our loop):
OrthoAdam with identity rotations is AdamW bit for bit, with Haar rotations another trajectory; SGD
and Muon (DeepSpeed's) run at the ZeRO stages they support and keep the parameter roles; what an
optimizer cannot run is refused when the config loads, with its reason; resume of SGD's momentum and
OrthoAdam's moments at another ZeRO stage (one process: bit for bit)."""

import pytest
import torch
from train_testlib import BASE, DEMO

from megatron_outeff.errors import OutEffError
from megatron_outeff.training.config import LAYOUT_KEYS, load_config


def _train(sets, hook=None):
    from megatron_outeff.training.train import train

    params = {}

    def keep(model):  # the parameters the engine updates in place (ZeRO-0: the module's own)
        params.update({n: p for n, p in model.named_parameters()})
        if hook is not None:
            hook(model)

    losses = [loss for _, loss in train(load_config(DEMO, BASE + sets), model_hook=keep)["history"]]
    return losses, {n: p.detach().clone() for n, p in params.items()}


@pytest.fixture(scope="module")
def adamw_run():
    return _train(["train.clip_grad=1.0"])


def test_orthoadam_identity_rotation_is_adamw_bit_for_bit(adamw_run, monkeypatch):
    from megatron_outeff.training import orthoadam

    monkeypatch.setattr(orthoadam, "axis_rotation", lambda n, *a, **k: torch.eye(n))
    losses, weights = _train(["train.clip_grad=1.0", "optimizer.type=orthoadam"])
    assert losses == adamw_run[0]
    for name, w in adamw_run[1].items():
        assert torch.equal(weights[name], w), name


def test_orthoadam_haar_rotation_is_another_trajectory(adamw_run):
    losses, weights = _train(["train.clip_grad=1.0", "optimizer.type=orthoadam"])
    assert losses[0] == adamw_run[0][0]  # the same start
    assert all(torch.isfinite(torch.tensor(losses))) and losses != adamw_run[0]
    moved = max((weights[n] - w).abs().max().item() for n, w in adamw_run[1].items())
    assert moved > 1e-4  # the rotation changes the steps (lr 1e-3, 4 steps)
    # the rotation seed is part of the run: another seed, another trajectory
    other, _ = _train(["train.clip_grad=1.0", "optimizer.type=orthoadam", "optimizer.rotation_seed=1"])
    assert other != losses


def test_orthoadam_rotations_follow_global_names_and_tp_rank():
    """The rotation of each axis is keyed by the parameter's global name; a split axis under TP by the
    rank too (checked on the keys, at TP=1 the split-axis suffix is absent)."""
    from megatron_outeff.megatron.parallel import init_model_parallel
    from megatron_outeff.training.model import build_model
    from megatron_outeff.training.optimizer import global_parameter_names, orthoadam_rotations
    from megatron_outeff.training.orthoadam import axis_rotation

    init_model_parallel(1, 1, 1)
    cfg = load_config(DEMO, BASE + ["optimizer.type=orthoadam", "optimizer.rotation_seed=5"])
    model = build_model(cfg)
    names = global_parameter_names(model)
    rot = orthoadam_rotations(model, cfg)
    for n, p in model.named_parameters():
        qs = rot(p)
        assert len(qs) == p.dim()
        for axis, q in enumerate(qs):
            assert torch.equal(q, axis_rotation(p.shape[axis], 5, f"{names[id(p)]}/axis{axis}", 1024)), n
    assert any(n.startswith("decoder.layers.1.") for n in names.values())


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_sgd_runs_at_every_zero_stage_with_the_same_curve(zero):
    sets = ["optimizer.type=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", f"parallel.zero_stage={zero}"]
    losses, _ = _train(sets)
    ref, _ = _train(["optimizer.type=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9"]) if zero else (losses, None)
    assert all(torch.isfinite(torch.tensor(losses)))
    # DeepSpeed's flat ZeRO partitions step the same elementwise SGD as the unpartitioned parameters
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-6, atol=0)


def test_sgd_keeps_the_parameter_roles():
    """One SGD step from zero gradients and zero momentum moves only the decayed parameters, by torch
    SGD's L2 form: w - lr * wd * w."""
    from megatron_outeff.megatron.parallel import init_model_parallel
    from megatron_outeff.training.model import build_model
    from megatron_outeff.training.optimizer import build_optimizer, decay_role, decays

    init_model_parallel(1, 1, 1)
    cfg = load_config(DEMO, BASE + ["optimizer.type=sgd", "optimizer.lr=0.5", "optimizer.decay_norm_weights=true"])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            decayed = decays(decay_role(name, p, module), cfg)
            want = before[id(p)] - 0.5 * (cfg.optimizer.weight_decay * before[id(p)]) if decayed else before[id(p)]
            torch.testing.assert_close(p.detach(), want, rtol=torch.finfo(torch.float32).eps, atol=0)


def test_muon_groups_hidden_matrices_and_keeps_roles():
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    from megatron_outeff.megatron.parallel import init_model_parallel
    from megatron_outeff.training.model import build_model
    from megatron_outeff.training.optimizer import build_optimizer

    init_model_parallel(1, 1, 1)
    cfg = load_config(DEMO, BASE + ["optimizer.type=muon", "optimizer.muon_lr=0.02", "optimizer.lr=1e-3"])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, MuonWithAuxAdam)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)].split(".", 3)[-1] for g in opt.param_groups if g["use_muon"] for p in g["params"])
    assert set(muon) == {
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    }
    adam = [names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    assert "embedding.word_embeddings.weight" in adam and "embedding.position_embeddings.weight" in adam
    for g in opt.param_groups:  # the role groups' decay survives the split; Muon's lr from muon_lr
        assert g["weight_decay"] == (cfg.optimizer.weight_decay if g["name"].startswith("decay") else 0.0)
        assert g["lr"] == (0.02 if g["use_muon"] else 1e-3)
        assert all(p.use_muon is g["use_muon"] for p in g["params"])


@pytest.fixture(scope="module")
def muon_zero0():
    return _train(["optimizer.type=muon", "optimizer.muon_lr=0.02", "optimizer.lr=1e-3"])


@pytest.mark.parametrize("zero", [1, 2])
def test_muon_at_zero_stages_follows_zero0(zero, muon_zero0, adamw_run):
    """DeepSpeed's ZeRO-1/2 Muon (orthogonalized while the partitions are filled) follows its
    unpartitioned Muon (ZeRO-0: the optimizer's own step); both move away from AdamW."""
    losses, _ = _train(
        ["optimizer.type=muon", "optimizer.muon_lr=0.02", "optimizer.lr=1e-3", f"parallel.zero_stage={zero}"]
    )
    ref = muon_zero0[0]
    assert all(torch.isfinite(torch.tensor(ref))) and ref != adamw_run[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["optimizer.type=adam"], "optimizer.type='adam': expected one of 'adamw', 'orthoadam', 'sgd', 'muon'"),
        (["optimizer.type=orthoadam", "parallel.zero_stage=1"], "optimizer.type=orthoadam with parallel.zero_stage=1"),
        (["optimizer.type=orthoadam", "precision.dtype=bf16"], "optimizer.type=orthoadam with precision.dtype=bf16"),
        (
            ["optimizer.type=sgd", "parallel.zero_stage=1", "parallel.cpu_offload=true"],
            "optimizer.type=sgd with parallel.cpu_offload",
        ),
        (["optimizer.type=muon", "parallel.tensor_parallel=2"], "optimizer.type=muon with parallel.tensor_parallel=2"),
        (
            ["optimizer.type=muon", "precision.dtype=bf16", "parallel.zero_stage=1"],
            "optimizer.type=muon with precision.dtype=bf16",
        ),
        (["optimizer.momentum=1.0"], "optimizer.momentum=1.0: expected a number in [0, 1)"),
        (["optimizer.rotation_block_size=0"], "optimizer.rotation_block_size=0"),
        (["optimizer.name=adamw"], "unknown config key 'optimizer.name'"),
    ],
)
def test_unsupported_optimizer_or_layout_is_refused_at_load(sets, message):
    with pytest.raises(OutEffError) as e:
        load_config(DEMO, BASE + sets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fingerprint_of_adamw_configs_is_unchanged_by_optimizer_type():
    """The new keys at their defaults hash as the section did before optimizer.type existed (a
    checkpoint written earlier stays this run's); any other optimizer is another run."""
    import hashlib
    import json

    cfg = load_config(DEMO, BASE)
    d = cfg.to_dict()
    for volatile in ("checkpoint", "logging"):
        d.pop(volatile)
    for k in ("exit_interval", "eval_interval", "eval_iters"):
        d["train"].pop(k)
    d["precision"].pop("max_skipped_steps")  # not part of any fingerprint (when a diverged run stops)
    for k in LAYOUT_KEYS:  # pinned in test_elastic.py
        d["parallel"].pop(k)
    o = d["optimizer"]
    d["optimizer"] = {
        "name": "adamw",
        "lr": o["lr"],
        "betas": o["betas"],
        "eps": o["eps"],
        "weight_decay": o["weight_decay"],
        "decay_norm_weights": o["decay_norm_weights"],
    }
    old = hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]
    assert cfg.fingerprint() == old
    fps = {
        load_config(DEMO, BASE + s).fingerprint()
        for s in (
            [],
            ["optimizer.type=orthoadam"],
            ["optimizer.type=orthoadam", "optimizer.rotation_seed=1"],
            ["optimizer.type=sgd"],
            ["optimizer.type=muon"],
            ["optimizer.momentum=0.5"],
        )
    }
    assert len(fps) == 6


@pytest.mark.parametrize("kind", ["sgd", "orthoadam", "muon"])
def test_resume_carries_the_optimizer_state(kind, tmp_path):
    """Stop at 2 of 4 steps and resume, one process: the same losses and weights as the uninterrupted
    run. SGD resumes at another ZeRO stage (elastic: our per-parameter files under SGD's own state
    name); OrthoAdam (ZeRO-0 only) at its own layout (DeepSpeed's files), and its per-parameter
    moments are written for a resume on another DP / PP layout (test_multiproc_optimizers.py)."""
    import json

    opt = {
        "sgd": ["optimizer.type=sgd", "optimizer.lr=0.05"],
        "orthoadam": ["optimizer.type=orthoadam"],
        "muon": ["optimizer.type=muon", "optimizer.muon_lr=0.02", "optimizer.lr=1e-3", "parallel.zero_stage=1"],
    }[kind]
    target = ["parallel.zero_stage=2"] if kind == "sgd" else []
    full, w_full = _train(opt + target)
    ck = tmp_path / "ck"
    first, _ = _train(opt + [f"checkpoint.dir={ck}", "train.exit_interval=2"])
    if kind == "muon":  # Muon's momentum lives in DeepSpeed's files only: same-layout resume
        assert not (ck / "iter_0000002" / "optimizer").exists()
    else:
        meta = json.loads((ck / "iter_0000002" / "optimizer" / "state.json").read_text())
        assert meta["moments"] == (["momentum_buffer"] if kind == "sgd" else ["exp_avg", "exp_avg_sq"])
        assert all((ck / "iter_0000002" / "optimizer" / k / "tp00_pp00.safetensors").is_file() for k in meta["moments"])
    second, w_second = _train(opt + target + [f"checkpoint.dir={ck}"])
    assert first + second == full
    for n, w in w_full.items():
        assert torch.equal(w_second[n], w), n


def test_resume_with_another_optimizer_state_is_refused(tmp_path):
    """A checkpoint whose per-parameter state belongs to another optimizer (forced with --resume) is
    refused at another layout, naming both."""
    from megatron_outeff.training import elastic

    ck = tmp_path / "ck"
    _train(["optimizer.type=sgd", "optimizer.lr=0.05", f"checkpoint.dir={ck}", "train.exit_interval=2"])
    tag = ck / "iter_0000002"
    assert elastic.check_resume(load_config(DEMO, BASE + ["optimizer.type=sgd", "optimizer.lr=0.05"]), tag, 1) is None
    reason = elastic.check_resume(load_config(DEMO, BASE + ["parallel.zero_stage=1"]), tag, 1)
    assert (
        "holds optimizer state ['momentum_buffer'], but optimizer.type=adamw keeps ['exp_avg', 'exp_avg_sq']" in reason
    )
    reason = elastic.check_resume(load_config(DEMO, BASE + ["optimizer.type=muon", "parallel.zero_stage=1"]), tag, 1)
    assert reason.startswith("optimizer.type=muon: resuming") and "resume at the saved layout" in reason
