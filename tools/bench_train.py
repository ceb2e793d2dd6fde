"""Training throughput benchmark: tokens/s and peak memory of vanilla, Softmax_1 and gated attention.

A benchmark, not a test. Every variant runs through the real training components (megatron-core
OPT model, DeepSpeed engine, the project's train_step) on synthetic tokens. All engines are built in
ONE process and stepped round-robin (A B C A B C ...), so drift of a shared machine falls on all
variants alike; the table prints each variant's median step time and its ratio to vanilla.

Outlier-metric overhead: the time of one OutlierMonitor measurement (forward hooks + attention-mass
probe on one micro-batch) divided by --outlier-interval training steps (the issue's target: <= 5%
at the default interval; 0 when disabled, since nothing is built then).

Peak memory: on CUDA, torch.cuda.max_memory_allocated over each variant's own steps. On CPU, the
peak resident set (VmHWM) of a fresh subprocess that builds the variant and runs a few steps.

Defaults: on CUDA the paper's OPT-125m at seq 2048, bf16, ZeRO-1 and MFU from --peak-tflops (H100 /
H200 SXM dense bf16 by the datasheet: 989); on CPU the demo's small OPT at seq 128, fp32. Results:
--output-json (device, versions, command, rows, targets) and --output-md.

Targets (TARGETS; meant for OPT-125m in bf16 on one H100/H200; computed on any device, so that a CPU
rehearsal exercises them, but only CUDA values mean anything): Softmax_1 tokens/s >= 0.97x vanilla,
and Softmax_1 >= 400k tokens/s.

    python tools/bench_train.py [--steps 20] [--warmup 3] [--output-json tools/results/bench_train_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_outeff.utils.cli import (
    OneLineArgumentParser, command, nonnegative_int, output_file, positive_float, positive_int,
)

ROOT = Path(__file__).resolve().parents[1]

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# (name, row variant, row key, goal): met when row[key] >= goal
TARGETS = (
    ("OPT-125m Softmax_1 tokens/s >= 0.97x vanilla", "softmax1", "throughput_vs_vanilla", 0.97),
    ("OPT-125m Softmax_1 >= 400k tokens/s", "softmax1", "tokens_per_s", 400e3),
)
VARIANTS = {
    "vanilla": {"softmax": "vanilla"},
    "softmax1": {"softmax": "softmax1"},
    "gated softmax1": {"softmax": "softmax1", "gate": "linear"},
}


def base_overrides(cuda: bool, seq: int | None, micro_batch: int | None) -> tuple[str, list[str]]:
    """(config path, overrides) for the default shape of this device."""
    common = ["data.source=synthetic", "checkpoint.dir=", "logging.tensorboard_dir=", "logging.outlier_interval=0",
              "train.eval_interval=0", "model.arch_overrides.hidden_dropout=0.0"]
    if cuda:
        seq, mb = seq or 2048, micro_batch or 8
        return str(ROOT / "configs/train/opt-125m-paper.yaml"), common + [
            f"data.seq_length={seq}", "model.arch_overrides.max_position_embeddings=2048", "precision.dtype=bf16",
            "parallel.zero_stage=1", f"parallel.micro_batch_size={mb}", f"parallel.global_batch_size={mb}"]
    seq, mb = seq or 128, micro_batch or 16
    return str(ROOT / "configs/train/demo-shakespeare.yaml"), common + [
        f"data.seq_length={seq}", f"parallel.micro_batch_size={mb}", f"parallel.global_batch_size={mb}"]


def build(cfg_path: str, overrides: list[str], variant: dict):
    """One variant's (trainer, data source, config) through the training package's own builder."""
    from megatron_outeff.training.config import load_config
    from megatron_outeff.training.engine import build_trainer

    attention = [f"attention.{k}={v}" for k, v in variant.items()]
    cfg = load_config(cfg_path, overrides + attention)
    trainer, data, _ = build_trainer(cfg)
    return trainer, data, cfg


def model_flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6 x parameters (matmuls, fwd + bwd) + 12 x layers x hidden x seq (attention)."""
    from megatron_outeff.training.model import arch_config

    a = arch_config(cfg)
    h, L, s = a.hidden_size, a.num_layers, cfg.data.seq_length
    params = L * (4 * h * h + 2 * h * a.ffn_hidden_size) + a.vocab_size * h
    return 6 * params + 12 * L * h * s


def memory_probe(args) -> None:
    """Child process: build one variant, run a few steps, print peak RSS in MiB."""
    from megatron_outeff.megatron.parallel import init_model_parallel
    from megatron_outeff.training.step import train_step

    cfg_path, overrides = base_overrides(False, args.seq, args.micro_batch)
    init_model_parallel(1, 1, seed=1234)
    trainer, data, _ = build(cfg_path, overrides, VARIANTS[args.memory_probe])
    for _ in range(3):
        train_step(trainer, data.next_global_batch())
    status = Path("/proc/self/status").read_text()
    hwm_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(f"PEAK_RSS_MIB {hwm_kib / 1024:.1f}")


@command
def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps per variant first")
    parser.add_argument("--seq", type=positive_int, default=None, help="sequence length (default: 2048 CUDA / 128 CPU)")
    parser.add_argument("--micro-batch", type=positive_int, default=None, help="micro-batch size (default: 8 CUDA / 16 CPU)")
    parser.add_argument("--outlier-interval", type=positive_int, default=None,
                        help="interval for the overhead figure (default: 1000 CUDA, the paper recipe's; 200 CPU, the demo's)")
    parser.add_argument("--peak-tflops", type=positive_float, default=989.0, help="device peak for MFU (CUDA only)")
    parser.add_argument("--output-json", type=output_file, default=None, help="write the results as JSON here")
    parser.add_argument("--output-md", type=output_file, default=None, help="write a Markdown table here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return 0

    import torch

    from megatron_outeff.megatron.parallel import init_model_parallel
    from megatron_outeff.training.step import train_step

    cuda = torch.cuda.is_available()
    cfg_path, overrides = base_overrides(cuda, args.seq, args.micro_batch)
    init_model_parallel(1, 1, seed=1234)
    runs = {name: build(cfg_path, overrides, v) for name, v in VARIANTS.items()}
    cfg = next(iter(runs.values()))[2]
    tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_length

    times = {name: [] for name in runs}
    peak = {name: 0 for name in runs}
    for step in range(args.warmup + args.steps):
        for name, (trainer, data, _) in runs.items():  # round-robin across variants
            batch = data.next_global_batch()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train_step(trainer, batch)
            if cuda:
                torch.cuda.synchronize()
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    if not cuda:  # per-variant peak RSS in fresh subprocesses
        for name in runs:
            cmd = [sys.executable, __file__, "--memory-probe", name] + (
                ["--seq", str(args.seq)] if args.seq else []) + (
                ["--micro-batch", str(args.micro_batch)] if args.micro_batch else [])
            # A fresh single-process group: drop the rendezvous variables this process set for itself.
            env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
            out = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONWARNINGS": "ignore"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_RSS_MIB")), None)
            if line is None:
                raise RuntimeError(f"memory probe for {name!r} failed: {out.stderr.strip().splitlines()[-1:]}")
            peak[name] = float(line.split()[1]) * 2**20

    # Outlier metrics: one measurement per variant (timed after a warm-up call), as the loop runs it.
    from megatron_outeff.training.step import eval_loss
    from megatron_outeff.training.outliers import OutlierMonitor

    interval = args.outlier_interval or (1000 if cuda else 200)
    probe_s = {}
    for name, (trainer, data, _) in runs.items():
        monitor = OutlierMonitor(trainer.engine.module, interval)
        probe = data.next_global_batch()[:1]
        samples = []
        for _ in range(4):
            t0 = time.perf_counter()
            monitor.measure(lambda: eval_loss(trainer, probe))
            if cuda:
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        probe_s[name] = statistics.median(samples[1:])

    flops_per_token = model_flops_per_token(cfg)
    base = statistics.median(times["vanilla"])
    rows = []
    for name in runs:
        med = statistics.median(times[name])
        tok_s = tokens_per_step / med
        row = {"variant": name, "median_step_s": med, "tokens_per_s": tok_s, "throughput_vs_vanilla": base / med,
               "peak_memory_mib": peak[name] / 2**20, "outlier_probe_s": probe_s[name],
               "outlier_overhead": probe_s[name] / (interval * med)}
        if cuda:
            row["mfu"] = tok_s * flops_per_token / (args.peak_tflops * 1e12)
        rows.append(row)

    import deepspeed
    import megatron.core

    device = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    result = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "device": device,
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "megatron_core": megatron.core.__version__, "python": platform.python_version()},
        "shape": {"config": os.path.relpath(cfg_path, ROOT), "overrides": overrides,
                  "global_batch": cfg.parallel.global_batch_size, "seq_length": cfg.data.seq_length,
                  "dtype": cfg.precision.dtype, "zero_stage": cfg.parallel.zero_stage},
        "steps": args.steps, "warmup": args.warmup, "outlier_interval": interval,
        "memory": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) of a fresh process per variant",
        "load_average": os.getloadavg(),
        "rows": rows,
        "targets": [{"target": name, "value": next(r[key] for r in rows if r["variant"] == variant), "goal": goal, "op": ">=",
                     "met": next(r[key] for r in rows if r["variant"] == variant) >= goal}
                    for name, variant, key, goal in TARGETS],
    }
    header = (f"| variant | median step s | tokens/s | x vanilla throughput | peak MiB | outlier overhead (1 per {interval} steps) |"
              + (" MFU |" if cuda else ""))
    lines = [f"# Training throughput ({device})", "", f"Command: `{result['command']}`", "",
             f"Versions: {result['versions']}; shape: {result['shape']}; memory: {result['memory']}; "
             f"load average at end: {result['load_average']}", "", header,
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    for r in rows:
        line = (f"| {r['variant']} | {r['median_step_s']:.4f} | {r['tokens_per_s']:.0f} | "
                f"{r['throughput_vs_vanilla']:.3f} | {r['peak_memory_mib']:.0f} | "
                f"{100 * r['outlier_overhead']:.2f}% ({r['outlier_probe_s']:.3f} s) |")
        lines.append(line + (f" {r['mfu']:.3f} |" if cuda else ""))
    lines.append("\nTargets" + ("" if cuda else " (CPU: values meaningless)") + ": " + "; ".join(
        f"{t['target']}: {'MET' if t['met'] else 'NOT MET'} ({t['value']:.3f})" for t in result["targets"]))
    text = "\n".join(lines)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    if args.output_md:
        Path(args.output_md).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
