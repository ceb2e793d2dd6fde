"""Multi-process runs (torchrun over gloo) and process-level behaviour (signals, crash in save).

Every layout reproduces the single-process oracle's loss curve (fp32, no clipping, no dropout).
"""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_testlib import (
    BASE,
    PYTHON,
    ROOT,
    assert_exit_0,
    env,
    run,
    run_torchrun,
    tensorboard_scalars,
    torchrun_launcher,
    train_cmd,
)

pytestmark = pytest.mark.multiproc
WORKER = str(Path(__file__).with_name("layouts_worker.py"))
TOL = 1e-5


def _check_layouts(nproc, layouts, oracle, oracle_clip, tmp_path):
    r = run_torchrun(WORKER, tmp_path / "out.json", *layouts, nproc=nproc, timeout=560, WEIGHTS=str(oracle["weights"]))
    assert_exit_0(r)
    results = json.loads((tmp_path / "out.json").read_text())
    assert sorted(results) == sorted(layout.split(":")[0] for layout in layouts)
    # "<name>_part1" + "<name>_part2": a run stopped (exit_interval) and resumed from its checkpoint
    for part1 in [n for n in results if n.endswith("_part1")]:
        base = part1[: -len("_part1")]
        results[base] = results.pop(part1) + results.pop(base + "_part2")
    for name, losses in results.items():
        expected = oracle_clip if name.endswith("_clip") else oracle
        tol = 5e-3 if "bf16" in name else TOL  # bf16 layouts: a smoke check against the fp32 curve
        assert losses == pytest.approx(expected["losses"], abs=tol), name


CLIP = "train.clip_grad=0.5"


def test_parallel_layouts_match_single_process(oracle, oracle_clip, tmp_path):
    """2 processes: DP=2 under ZeRO 0/1/2/3, TP=2 (with and without SP), PP=2 under ZeRO 0/1,
    activation recomputation, ZeRO-2 with CPU offload, and stop/resume under ZeRO-3 and PP."""
    _check_layouts(
        2,
        [
            "dp_zero0:",
            "dp_zero1:parallel.zero_stage=1",
            "dp_zero2:parallel.zero_stage=2",
            "dp_zero3:parallel.zero_stage=3",
            "tp2_zero0:parallel.tensor_parallel=2",
            "tp2_sp_zero1:parallel.tensor_parallel=2,parallel.sequence_parallel=true,parallel.zero_stage=1",
            "pp2_zero1:parallel.pipeline_parallel=2,parallel.zero_stage=1",
            f"pp2_zero0_clip:parallel.pipeline_parallel=2,{CLIP}",
            f"tp2_sp_zero2_clip:parallel.tensor_parallel=2,parallel.sequence_parallel=true,parallel.zero_stage=2,{CLIP}",
            "dp_zero1_recompute:parallel.zero_stage=1,model.recompute_granularity=full",
            "pp2_zero1_bf16:parallel.pipeline_parallel=2,parallel.zero_stage=1,precision.dtype=bf16",
            "dp_zero2_bf16:parallel.zero_stage=2,precision.dtype=bf16",
            "dp_zero2_cpu_offload:parallel.zero_stage=2,parallel.cpu_offload=true",  # DeepSpeedCPUAdam
            # stop after 2 steps, resume from the checkpoint: ZeRO-3 shards and a pipeline's stages
            *[
                f"{name}_{part}:{sets},checkpoint.dir={tmp_path / name}{',train.exit_interval=2' if part == 'part1' else ''}"
                for name, sets in (
                    ("dp_zero3_resumed", "parallel.zero_stage=3"),
                    ("pp2_zero1_resumed_clip", f"parallel.pipeline_parallel=2,parallel.zero_stage=1,{CLIP}"),
                )
                for part in ("part1", "part2")
            ],
        ],
        oracle,
        oracle_clip,
        tmp_path,
    )


@pytest.mark.slow
def test_four_process_layouts_match_single_process(oracle, oracle_clip, tmp_path):
    """4 processes: TP=2 x DP=2 and PP=2 x DP=2 (ZeRO-1), with clipping."""
    _check_layouts(
        4,
        [
            f"tp2_dp2_zero1_clip:parallel.tensor_parallel=2,parallel.zero_stage=1,{CLIP}",
            f"pp2_dp2_zero1_clip:parallel.pipeline_parallel=2,parallel.zero_stage=1,{CLIP}",
            "tp2_pp2:parallel.tensor_parallel=2,parallel.pipeline_parallel=2",
        ],
        oracle,
        oracle_clip,
        tmp_path,
    )


def test_divergence_on_one_rank_stops_every_rank_before_the_update(tmp_path):
    """A NaN gradient or loss at step 3 on one rank only: every rank stops at iteration 3 with the same
    message, before the update, and latest stays the finite checkpoint of iteration 2 (keep_last=1), on
    the pipeline path where we clip (fp32 ZeRO-0) and where DeepSpeed clips (ZeRO-1), under data
    parallelism where we clip and under ZeRO-2, and under tensor parallelism (one shard's NaN)."""
    from safetensors.torch import load_file

    layouts = {
        "pp2_zero0_own_clipping": ("grad", 1, f"parallel.pipeline_parallel=2,{CLIP}"),
        "pp2_zero1": ("grad", 1, "parallel.pipeline_parallel=2,parallel.zero_stage=1"),
        "pp2_zero1_loss": ("loss", 1, "parallel.pipeline_parallel=2,parallel.zero_stage=1"),
        "dp2_zero0_own_clipping": ("grad", 1, CLIP),
        "dp2_zero2": ("grad", 1, "parallel.zero_stage=2"),
        "tp2_zero1": ("grad", 1, "parallel.tensor_parallel=2,parallel.zero_stage=1"),
    }
    args = [f"{name}:{kind}:{rank}:{sets}" for name, (kind, rank, sets) in layouts.items()]
    worker = Path(__file__).with_name("diverge_worker.py")
    assert_exit_0(run_torchrun(worker, tmp_path / "out.json", tmp_path, *args, timeout=900))
    results = json.loads((tmp_path / "out.json").read_text())
    for name, (kind, _, _) in layouts.items():
        messages = results[name]
        assert messages[0] is not None and messages == [messages[0]] * 2, (name, messages)
        stat = "lm loss" if kind == "loss" else "grad norm"
        assert messages[0].startswith(f"iteration 3: {stat} is "), (name, messages[0])
        ck = tmp_path / name
        assert (ck / "latest").read_text().strip() == "iter_0000002", name
        assert sorted(p.name for p in ck.iterdir() if p.name.startswith("iter_")) == ["iter_0000002"], name
        files = list((ck / "iter_0000002" / "model").glob("*.safetensors"))
        assert len(files) == (1 if name.startswith("dp") else 2), name
        for f in files:
            assert all(bool(t.float().isfinite().all()) for t in load_file(str(f)).values()), (name, f)


def _losses(stdout):
    return [float(line.split("|")[1].split()[-1]) for line in stdout.splitlines() if line.startswith("iter ")]


def _train_cmd(sets, launcher=(PYTHON,)):
    return train_cmd(BASE + sets, launcher)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_at_end_of_step_and_exits_0(sig, tmp_path):
    ck = tmp_path / "ck"
    p = subprocess.Popen(
        _train_cmd(["train.train_iters=100000", f"checkpoint.dir={ck}"]),
        env=env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    deadline = time.time() + 300
    for line in p.stdout:
        lines.append(line)
        if line.startswith("iter 2 "):
            p.send_signal(sig)
            break
        assert time.time() < deadline
    out = "".join(lines) + p.communicate(timeout=120)[0]
    assert p.returncode == 0, out[-3000:]
    assert "stop requested" in out
    tag = (ck / "latest").read_text().strip()
    state = json.loads((ck / tag / "train_state.json").read_text())
    assert 2 <= state["iteration"] < 100000 and tag == f"iter_{state['iteration']:07d}"


def _signal_at_line(cmd, prefix, sig=signal.SIGTERM, timeout=300):
    """Run cmd, send it `sig` as soon as a line of its output starts with `prefix`; (returncode, output)."""
    p = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + timeout
    for line in p.stdout:
        lines.append(line)
        if line.startswith(prefix):
            p.send_signal(sig)
            break
        assert time.time() < deadline, "".join(lines)[-3000:]
    out = "".join(lines) + p.communicate(timeout=timeout)[0]
    return p.returncode, out


def _snapshot(path):
    return {
        str(f.relative_to(path)): (f.stat().st_mtime_ns, f.read_bytes() if f.is_file() else None)
        for f in sorted(path.rglob("*"))
    }


@pytest.mark.parametrize("resumed", [False, True], ids=["new_run", "resuming"])
def test_sigterm_during_startup_exits_0_without_writing(resumed, tmp_path):
    """SIGTERM while the trainer starts (as scancel sends it to every task), here right after the
    checkpoint directory is claimed, before the model is built and a checkpoint loaded: exit 0 and
    nothing written (no checkpoint, run.json, TensorBoard), a resumable directory untouched. It used
    to kill the trainer (exit -15): the handler came only after the model and checkpoint."""
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    sets = [f"checkpoint.dir={ck}", f"logging.tensorboard_dir={tb}", "train.train_iters=4"]
    if resumed:
        r = run(_train_cmd(sets + ["train.exit_interval=2"]), timeout=300)
        assert r.returncode == 0 and (ck / "latest").read_text().strip() == "iter_0000002", r.stderr[-2000:]
    before = _snapshot(tmp_path)
    code, out = _signal_at_line(_train_cmd(sets), "world 1 = ")
    assert code == 0, out[-3000:]
    assert "stop requested before the first step" in out and "\niter " not in out, out[-3000:]
    assert _snapshot(tmp_path) == before


def test_sigterm_to_torchrun_during_startup_exits_0_without_writing(tmp_path):
    """torchrun forwards its SIGTERM to the workers and kills them after a timeout: both trainers stop
    before the first step, exit 0 in time (no forced kill) and write nothing."""
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    cmd = _train_cmd(
        [f"checkpoint.dir={ck}", f"logging.tensorboard_dir={tb}", "parallel.zero_stage=1"], torchrun_launcher()
    )
    code, out = _signal_at_line(cmd, "world 2 = ")
    # torchrun itself then exits 1 with its own SignalException traceback (its way of reporting the signal)
    assert "stop requested before the first step" in out, out[-3000:]
    assert "forcefully" not in out and not re.search(r'File ".*megatron_outeff', out), out[-3000:]
    assert not ck.exists() and not tb.exists()


def test_kill_during_save_leaves_previous_checkpoint_loadable(oracle, tmp_path):
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    sets = [f"checkpoint.dir={ck}", "checkpoint.save_interval=2", f"logging.tensorboard_dir={tb}"]
    r = run(_train_cmd(sets), timeout=300, OUTEFF_TEST_KILL_IN_SAVE="4")
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    assert (ck / "latest").read_text().strip() == "iter_0000002"
    assert (ck / "iter_0000004.tmp").is_dir() and not (ck / "iter_0000004").exists()
    crashed = _losses(r.stdout)
    assert len(crashed) == 4
    # the same command again resumes from iteration 2 and reproduces the uninterrupted curve
    r = run(_train_cmd(sets), timeout=300)
    assert_exit_0(r, 2000)
    assert "resumed from" in r.stdout and "iter_0000002" in r.stdout
    resumed = _losses(r.stdout)
    assert resumed == pytest.approx(oracle["losses"][2:], abs=TOL)
    assert (ck / "latest").read_text().strip() == "iter_0000004"
    assert not (ck / "iter_0000004.tmp").exists()
    # TensorBoard: the crashed run's steps 3-4 (written before the kill) are purged on every tag and
    # axis; each tag holds one value per step: the crashed run's up to the checkpoint, then the resumed run's
    scalars = tensorboard_scalars(tb)
    for tag, events in scalars.items():
        steps = [step for step, _ in events]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [s for s, _ in scalars["lm loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["lm loss"]] == pytest.approx(crashed[:2] + resumed, rel=1e-6)
    assert [s for s, _ in scalars["lm loss vs samples"]] == [4, 8, 12, 16]
    assert [s for s, _ in scalars["learning-rate vs tokens"]] == [128, 256, 384, 512]
    assert [s for s, _ in scalars["iteration-time"]] == [1, 2, 3, 4]


def test_config_typo_writes_nothing_and_the_corrected_command_runs(tmp_path):
    """A typo anywhere in the config (the attention variant, megatron's transformer overrides) is one
    error line and exit code 2 before anything is written; the corrected command then just runs."""
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    sets = [f"checkpoint.dir={ck}", f"logging.tensorboard_dir={tb}", "train.train_iters=2"]
    for typo, name in (
        ("attention.sofmax=softmax1", "sofmax"),
        ("model.transformer_overrides={hiden_dropout: 0.0}", "hiden_dropout"),
    ):
        r = run(_train_cmd(sets + [typo]), timeout=120)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and name in errors[0], r.stderr[-2000:]
        assert not ck.exists() and not tb.exists() and list(tmp_path.iterdir()) == []
    assert_exit_0(run(_train_cmd(sets + ["attention.softmax=softmax1"]), timeout=300), 2000)
    assert (ck / "latest").read_text().strip() == "iter_0000002" and (ck / "run.json").exists()


def test_config_error_is_one_line_before_start(tmp_path):
    r = run(_train_cmd(["parallel.pipeline_parallel=2", "parallel.zero_stage=3"]), timeout=120)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ZeRO-2/3" in errors[0], r.stderr[-2000:]
