"""A diverged run stops before the update of its first non-finite step and keeps its last finite
checkpoint (issue 19 item 1), through the real DeepSpeed engine on every single-process optimizer
path; the multi-process paths (pipeline, data parallel with one rank's NaN) are in test_multiproc.py."""

import json
import math

import pytest
import torch
from train_testlib import BASE, DEMO, poison_hook, read_model_file, run, train_cmd

from megatron_outeff.training.config import load_config
from megatron_outeff.training.step import DIVERGED_EXIT_CODE, SkippedSteps, StepResult, TrainingDiverged
from megatron_outeff.training.train import train

MICRO = 4  # BASE: global batch 4 of micro-batches of 1 on one rank

# (id, overrides): every optimizer path a single process can take. fp32 ZeRO-0 is the path where we
# clip (optimizer.clips_itself); everywhere else DeepSpeed computes the norm and skips the update.
PATHS = [
    ("fp32_zero0_own_clipping", ["parallel.zero_stage=0", "train.clip_grad=1.0"]),
    ("fp32_zero0_clip_off", ["parallel.zero_stage=0"]),
    ("fp32_zero1", ["parallel.zero_stage=1", "train.clip_grad=1.0"]),
    ("fp32_zero2_clip_off", ["parallel.zero_stage=2"]),
    ("fp32_zero3", ["parallel.zero_stage=3", "train.clip_grad=1.0"]),
    ("bf16_zero0", ["parallel.zero_stage=0", "precision.dtype=bf16", "train.clip_grad=1.0"]),
    ("bf16_zero1", ["parallel.zero_stage=1", "precision.dtype=bf16"]),
    ("bf16_zero3", ["parallel.zero_stage=3", "precision.dtype=bf16", "train.clip_grad=1.0"]),
]


def _cfg(ck, sets):
    return load_config(
        DEMO,
        BASE
        + [
            f"checkpoint.dir={ck}",
            "checkpoint.save_interval=1",
            "checkpoint.keep_last=1",
            "train.train_iters=5",
            *sets,
        ],
    )


def _all_finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())


@pytest.mark.parametrize("sets", [s for _, s in PATHS], ids=[i for i, _ in PATHS])
def test_nonfinite_gradient_stops_before_the_update(sets, tmp_path):
    """A NaN in one gradient element at step 3 (the loss stays finite): the run raises at iteration 3
    before any update (the weights in memory are still the checkpoint of iteration 2), saves nothing
    more, and keep_last=1 keeps that finite checkpoint as latest. Without the check ZeRO-0 applied the
    NaN and went on saving; ZeRO >= 1 skipped this and every later NaN step and went on saving."""
    ck = tmp_path / "ck"
    hook = poison_hook(3, MICRO, "grad")
    with pytest.raises(TrainingDiverged) as e:
        train(_cfg(ck, sets), model_hook=hook)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("iteration 3: grad norm is "), msg
    assert "stopped before its optimizer step" in msg and "iter_0000002" in msg and "--resume" in msg, msg
    assert (ck / "latest").read_text().strip() == "iter_0000002"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]
    saved = read_model_file(ck, "iter_0000002")
    assert _all_finite(saved)
    # no update from step 3: the module still holds exactly the weights saved after step 2
    # (ZeRO-3 keeps only partitions in the module: its check is the checkpoint above)
    if "parallel.zero_stage=3" not in sets:
        from megatron_outeff.training.model import unwrap

        state = {k: v for k, v in unwrap(hook.models[0]).state_dict().items() if k in saved}
        assert state and all(torch.equal(state[k], saved[k]) for k in state)


@pytest.mark.parametrize(
    "sets",
    [["parallel.zero_stage=0"], ["parallel.zero_stage=2", "precision.dtype=bf16"]],
    ids=["fp32_zero0", "bf16_zero2"],
)
def test_nonfinite_loss_stops_before_the_update(sets, tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(
        TrainingDiverged,
        match=r"^iteration 3: lm loss is nan; expected a finite value; training "
        r"stopped before its optimizer step",
    ):
        train(_cfg(ck, sets), model_hook=poison_hook(3, MICRO, "loss"))
    assert (ck / "latest").read_text().strip() == "iter_0000002"
    assert _all_finite(read_model_file(ck, "iter_0000002"))


def test_nonfinite_weights_are_never_saved(tmp_path):
    """An update can overflow the weights with a finite loss and gradient norm (here AdamW's decoupled
    decay at lr x weight_decay = 1e39 in step 2; step 1 has lr 0): the checkpoint of iteration 2 is
    refused before anything of it is written, naming the weight, and keep_last=1 keeps the finite
    checkpoint of iteration 1."""
    ck = tmp_path / "ck"
    cfg = _cfg(ck, ["optimizer.lr=1e33", "optimizer.weight_decay=1e6", "schedule.decay_style=constant"])
    with pytest.raises(
        TrainingDiverged,
        match=r"^weight \S+ after iteration 2: \d+ non-finite value\(s\) \(nan/inf\) "
        r"of \d+; expected finite values; not saved\. \S+latest names iter_0000001",
    ):
        train(cfg)
    assert (ck / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_")) == ["iter_0000001"]
    assert _all_finite(read_model_file(ck, "iter_0000001"))


def test_diverged_cli_run_is_one_line_exit_3_and_the_rerun_does_not_start_over(tmp_path):
    """A run that diverges by itself (lr 1e30 from step 2: the weights reach ~1e30, the forward of step 3
    overflows): one `error:` line, exit code 3, latest is the finite checkpoint of iteration 2; the same
    command again resumes from it and diverges at the same step (resume is exact), writing nothing."""
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    cmd = train_cmd(
        BASE
        + [
            f"checkpoint.dir={ck}",
            f"logging.tensorboard_dir={tb}",
            "checkpoint.save_interval=1",
            "checkpoint.keep_last=1",
            "train.train_iters=6",
            "optimizer.lr=1e30",
            "schedule.decay_style=constant",
        ]
    )
    errors = []
    for attempt in range(2):
        r = run(cmd, timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == DIVERGED_EXIT_CODE and len(lines) == 1, r.stdout[-2000:] + r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        errors.append(lines[0])
        assert (ck / "latest").read_text().strip() == "iter_0000002"
        assert sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"]
        assert _all_finite(read_model_file(ck, "iter_0000002"))
        if attempt:
            assert "resumed from" in r.stdout and "iter_0000002" in r.stdout, r.stdout[-2000:]
    assert errors[0] == errors[1] and errors[0].startswith("error: iteration 3: lm loss is "), errors
    state = json.loads((ck / "iter_0000002" / "train_state.json").read_text())
    assert state["iteration"] == 2


def test_skipped_steps_counter_over_deepspeed_skips():
    """The fp16 rule (stop after precision.max_skipped_steps skipped steps in a row) cannot run through
    DeepSpeed's fp16 engine on a CPU. Here the counter is fed real skipped steps: a fp32 ZeRO-1 engine
    skips the update whenever a gradient is NaN (injected at steps 2, 4, 5); with a limit of 2 an
    isolated skip passes, two in a row stop the run. In fp32 / bf16 the limit is 1."""
    from megatron.core import parallel_state as ps

    from megatron_outeff.megatron.parallel import init_distributed, init_model_parallel
    from megatron_outeff.training.engine import build_trainer
    from megatron_outeff.training.step import train_step

    cfg = load_config(DEMO, BASE + ["parallel.zero_stage=1", "train.train_iters=6"])
    init_distributed()
    init_model_parallel(1, 1, cfg.train.seed)
    assert ps.get_data_parallel_world_size() == 1
    hooks = [poison_hook(k, MICRO, "grad") for k in (2, 4, 5)]
    trainer, data, _ = build_trainer(cfg, prepare_model=lambda m: [h(m) for h in hooks])
    counter = SkippedSteps(limit=2, fp16=True)
    seen = []
    with pytest.raises(
        TrainingDiverged,
        match=r"^2 steps in a row skipped by the fp16 loss scaler .*"
        r"expected fewer than precision.max_skipped_steps=2",
    ):
        for _ in range(6):
            result = train_step(trainer, data.next_global_batch())
            seen.append((result.skipped, math.isfinite(result.grad_norm)))
            counter.update(result)
    assert seen == [(False, True), (True, False), (False, True), (True, False), (True, False)]
    assert trainer.engine.skipped_steps == 3
    # the limits by precision: fp32 / bf16 stop at the first skipped step; fp16 at the config's count
    assert SkippedSteps.of(cfg).limit == 1
    fp16 = load_config(DEMO, BASE + ["precision.dtype=fp16", "precision.max_skipped_steps=7"])
    assert (SkippedSteps.of(fp16).limit, SkippedSteps.of(fp16).fp16) == (7, True)
    assert load_config(DEMO, BASE + ["precision.dtype=fp16"]).precision.max_skipped_steps == 10
    never = SkippedSteps(limit=0, fp16=True)  # 0: never stop
    for _ in range(100):
        never.update(StepResult(loss=1.0, grad_norm=float("inf"), loss_scale=1.0, lr=0.1, skipped=True))
