"""SIGKILL the trainer anywhere, resume each time: the final weights equal an uninterrupted run's, bit for bit.

A reliability check, not a benchmark (issue 19). One uninterrupted run of the trainer (a subprocess:
python -m megatron_outeff.training.train, fp32 on the CPU, dropout on, a checkpoint after every
step) is the reference. Then the same command runs again and again in another directory, each time
killed with SIGKILL, until --kills kills have landed; then it runs to the end. Each attempt draws
(from --seed) where it dies:
  - "in start-up": at a uniform random time before the reference run's first step (imports, process
    groups, model, engine, the checkpoint load);
  - "timed": at a uniform random time up to one and a half reference steps after the attempt logs its
    first step: in that step's save, the next step or its save (the rename, `latest`, pruning:
    wherever the clock falls);
  - "in-save": inside the save of one of the next two iterations, at a random point of the save
    (the trainer's test hook OUTEFF_TEST_KILL_IN_SAVE: after DeepSpeed's files and part of ours,
    after the rename but before `latest`, after `latest` but before pruning, in the middle of pruning).
After a kill, with probability --lose-pointer, `latest` is deleted too (a lost pointer: the rerun must
resume from the newest complete checkpoint). After every kill the directory is checked: every
complete-looking iter_* directory is a complete checkpoint with finite weights, and `latest`, if
present, names one. At the end every tensor of the final checkpoint's model files, Adam moments,
optimizer state and RNG states must equal the reference's bit for bit.

    python tools/sigkill_anywhere.py [--kills 12] [--seed 0] [--iters 12] [--zero-stage 1]
        [--workdir DIR] [--output-md tools/results/sigkill_anywhere.md]

Exit code 0 when everything matched, 1 otherwise. The Markdown report (--output-md) records the
command, versions, the machine's load, every attempt and the verdict.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from megatron_outeff.utils.cli import OneLineArgumentParser, command, nonnegative_int, output_file, positive_int

ROOT = Path(__file__).resolve().parents[1]
SAVE_POINTS = ("files", "renamed", "latest", "pruning")
KEEP_LAST = 2


def trainer_cmd(ckpt: Path, iters: int, zero_stage: int) -> list[str]:
    sets = [
        f"checkpoint.dir={ckpt}",
        "checkpoint.save_interval=1",
        f"checkpoint.keep_last={KEEP_LAST}",
        f"train.train_iters={iters}",
        "train.eval_interval=0",
        "logging.tensorboard_dir=null",
        "logging.outlier_interval=0",
        "logging.log_interval=1",
        "precision.dtype=fp32",
        f"parallel.zero_stage={zero_stage}",
        "parallel.micro_batch_size=1",
        "parallel.global_batch_size=4",
        "train.clip_grad=1.0",
        "schedule.warmup_iters=2",
        "model.arch_overrides={vocab_size: 256, hidden_dropout: 0.1, attention_dropout: 0.1}",
    ]
    cmd = [
        sys.executable,
        "-m",
        "megatron_outeff.training.train",
        "--config",
        str(ROOT / "configs/train/demo-tiny.yaml"),
    ]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def trainer_env(extra: dict | None = None) -> dict:
    from megatron_outeff.megatron.parallel import single_process_env

    env = single_process_env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OUTEFF_TEST_KILL_IN_SAVE", None)
    env.update(extra or {})
    return env


def run(cmd, env, kill: tuple[str, float] | None, log: Path) -> tuple[int, list[tuple[float, str]]]:
    """(return code, [(seconds since start, line), ...]) of cmd. ``kill`` = (prefix, seconds): SIGKILL it
    that many seconds after the first output line starting with prefix ("" = the start), if still running.
    The lines are also written to log."""
    start = time.time()
    p = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    lines, timers = [], []

    def arm(delay):
        timers.append(threading.Timer(delay, lambda: p.poll() is None and p.send_signal(signal.SIGKILL)))
        timers[-1].start()

    if kill is not None and kill[0] == "":
        arm(kill[1])

    def read():
        for line in p.stdout:
            lines.append((time.time() - start, line.rstrip("\n")))
            if kill is not None and kill[0] and not timers and line.startswith(kill[0]):
                arm(kill[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    p.wait()
    reader.join()
    for t in timers:
        t.cancel()
    log.write_text("".join(f"[{t:7.2f}] {line}\n" for t, line in lines))
    return p.returncode, lines


def complete_tags(ckpt: Path) -> list[str]:
    from megatron_outeff.checkpoint_format import TRAIN_STATE, checkpoint_tags

    return [t for t in checkpoint_tags(ckpt) if (ckpt / t / TRAIN_STATE).is_file()] if ckpt.is_dir() else []


def check_directory(ckpt: Path) -> list[str]:
    """Problems of a checkpoint directory after a kill: an iter_* directory that is not a complete
    checkpoint with finite model files, or a `latest` naming none."""
    import torch
    from safetensors.torch import load_file

    from megatron_outeff.checkpoint_format import checkpoint_tags, latest_tag

    problems = []
    if not ckpt.is_dir():
        return problems
    complete = complete_tags(ckpt)
    for tag in checkpoint_tags(ckpt):
        if tag not in complete:
            problems.append(f"{tag} has no train_state.json")
            continue
        files = sorted((ckpt / tag / "model").glob("*.safetensors"))
        if not files:
            problems.append(f"{tag} has no model files")
        for f in files:
            if not all(bool(torch.isfinite(t).all()) for t in load_file(str(f)).values()):
                problems.append(f"{f} holds non-finite weights")
    named = latest_tag(ckpt) if (ckpt / "latest").exists() else None
    if named is not None and named not in complete:
        problems.append(f"latest names {named!r}, not a complete checkpoint")
    return problems


def iteration_of(ckpt: Path) -> int:
    """The iteration the next attempt resumes from (the newest complete checkpoint or latest's)."""
    from megatron_outeff.training.checkpoint import resume_point

    tag, _ = resume_point(ckpt)
    return json.loads((ckpt / tag / "train_state.json").read_text())["iteration"] if tag else 0


def final_tensors(ckpt: Path, iters: int) -> dict:
    """{file/tensor: tensor} of everything the final checkpoint holds as safetensors, plus its JSON state."""
    from safetensors.torch import load_file

    tag_dir = ckpt / f"iter_{iters:07d}"
    out = {}
    for f in sorted(tag_dir.rglob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            out[f"{f.relative_to(tag_dir)}/{name}"] = t
    state = json.loads((tag_dir / "optimizer" / "state.json").read_text())
    train_state = json.loads((tag_dir / "train_state.json").read_text())
    out["optimizer/state.json"] = json.dumps(state, sort_keys=True)
    out["train_state.json"] = json.dumps({k: train_state[k] for k in ("iteration", "data")}, sort_keys=True)
    return out


def losses(lines) -> dict[int, str]:
    """{iteration: printed loss} of one attempt's output lines."""
    return {int(line.split()[1]): line.split("|")[1].split()[-1] for _, line in lines if line.startswith("iter ")}


def last_event(lines) -> str:
    events = [line for _, line in lines if line.startswith(("iter ", "saved ", "resumed from", "world ", "done at"))]
    if not events:
        return "(start-up)"
    return events[-1].split(" |")[0] if events[-1].startswith("iter ") else events[-1][:70]


@command
def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--kills",
        type=positive_int,
        default=12,
        help="SIGKILLs to land before the run may finish (fewer if it reaches its last step first; default 12)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--iters", type=positive_int, default=12, help="training steps (a checkpoint after each)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=1)
    p.add_argument("--lose-pointer", type=float, default=0.25, help="probability of deleting `latest` after a kill")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    p.add_argument("--output-md", type=output_file, default=None, help="the report (Markdown)")
    args = p.parse_args(argv)

    import torch

    rng = random.Random(args.seed)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sigkill-anywhere-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.time()

    ref_ckpt, ckpt = work / "reference", work / "killed"
    for d in (ref_ckpt, ckpt):
        shutil.rmtree(d, ignore_errors=True)
    code, ref_lines = run(
        trainer_cmd(ref_ckpt, args.iters, args.zero_stage), trainer_env(), None, work / "reference.log"
    )
    if code != 0:
        print((work / "reference.log").read_text()[-3000:])
        print(f"the uninterrupted run failed (exit {code})")
        return 1
    ref_seconds = ref_lines[-1][0]
    iter_times = [t for t, line in ref_lines if line.startswith("iter ")]
    first_step, per_step = iter_times[0], (iter_times[-1] - iter_times[0]) / max(1, len(iter_times) - 1)
    print(
        f"reference: {ref_seconds:.1f} s, {args.iters} steps; first step after {first_step:.1f} s, "
        f"then {per_step:.1f} s per step and save",
        flush=True,
    )

    rows, problems, all_losses = [], [], {}
    kills = attempt = 0
    while True:
        attempt += 1
        resume = iteration_of(ckpt)
        mode, env_extra, kill = "to the end", {}, None
        if kills < args.kills and resume < args.iters:
            draw = rng.random()
            if draw < 0.2:  # imports, process groups, model, engine, checkpoint load
                kill = ("", rng.uniform(0.0, 0.9 * first_step))
                mode = f"in start-up, at {kill[1]:.1f} s"
            elif draw < 0.6:  # the save of the first step, the next step or its save: wherever the clock falls
                kill = (f"iter {resume + 1} ", rng.uniform(0.0, 1.5 * per_step))
                mode = f"{kill[1]:.1f} s after step {resume + 1}"
            else:  # inside one of the next two saves, so that the kills spread over the run
                it = min(args.iters, resume + rng.randint(1, 2))
                existing = len(complete_tags(ckpt))
                points = [pt for pt in SAVE_POINTS if pt != "pruning" or existing + (it - resume) > KEEP_LAST]
                point = rng.choice(points)
                mode, env_extra = f"in the save of {it}: {point}", {"OUTEFF_TEST_KILL_IN_SAVE": f"{it}:{point}"}
        log = work / f"attempt{attempt:02d}.log"
        code, lines = run(trainer_cmd(ckpt, args.iters, args.zero_stage), trainer_env(env_extra), kill, log)
        for i, loss in losses(lines).items():
            all_losses.setdefault(i, set()).add(loss)
        lost = ""
        if code == -signal.SIGKILL:
            kills += 1
            found = check_directory(ckpt)
            problems += [f"attempt {attempt}: {x}" for x in found]
            if rng.random() < args.lose_pointer and (ckpt / "latest").exists():
                (ckpt / "latest").unlink()
                lost = "latest deleted"
        elif code != 0:
            problems.append(f"attempt {attempt}: exit code {code} (see {log})")
        rows.append((attempt, mode, f"iteration {resume}", code, last_event(lines), lost))
        print(
            f"attempt {attempt}: {rows[-1][1]}, resumed at {resume}, exit {code}, last: {rows[-1][4]} {lost}",
            flush=True,
        )
        if code == 0:
            break
        if attempt > 4 * args.kills + 10:
            problems.append("too many attempts")
            break

    mismatched = []
    if not problems:
        ref, got = final_tensors(ref_ckpt, args.iters), final_tensors(ckpt, args.iters)
        if sorted(ref) != sorted(got):
            mismatched.append(f"different files/tensors: {sorted(set(ref) ^ set(got))[:5]}")
        for name in sorted(set(ref) & set(got)):
            a, b = ref[name], got[name]
            same = a == b if isinstance(a, str) else (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
            if not same:
                mismatched.append(name)
        n_tensors = len(ref)
        ref_losses = losses(ref_lines)
        for i, seen in sorted(all_losses.items()):
            if seen != {ref_losses.get(i)}:
                mismatched.append(f"loss of iteration {i}: {sorted(seen)} vs {ref_losses.get(i)}")
    ok = not problems and not mismatched
    verdict = (
        f"final checkpoint equals the uninterrupted run's bit for bit ({n_tensors} tensors and states: model, "
        f"Adam moments, optimizer state, RNG) after {kills} SIGKILLs; every logged loss equal"
        if ok
        else f"FAILED: {problems or mismatched}"
    )
    print(verdict)

    if args.output_md:
        import deepspeed

        lines = [
            "# SIGKILL anywhere, resume each time (tools/sigkill_anywhere.py)",
            "",
            f"Command: `python tools/sigkill_anywhere.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; load average "
            f"{load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end (a shared machine); "
            f"python {platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}",
            f"Run: fp32, CPU, ZeRO-{args.zero_stage}, dropout 0.1, {args.iters} steps, a checkpoint after every step, "
            f"keep_last {KEEP_LAST}; reference (uninterrupted) {ref_seconds:.1f} s; total {time.time() - started:.0f} s.",
            "",
            "| attempt | killed | resumed at | exit | last line before the end | then |",
            "|---|---|---|---|---|---|",
            *[f"| {a} | {m} | {r} | {c} | `{e}` | {x} |" for a, m, r, c, e, x in rows],
            "",
            f"**Verdict**: {verdict}",
            "",
        ]
        Path(args.output_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_md).write_text("\n".join(lines))
    if not args.workdir and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
