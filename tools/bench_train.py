"""Training throughput benchmark: tokens/s, MFU and peak memory of vanilla, Softmax_1 and gated attention.

A benchmark, not a test. Every variant (by name from the one benchmark list,
megatron_outeff/bench/variants.py; --variants) runs through the real training components
(megatron-core OPT model, DeepSpeed engine, the project's train_step) on synthetic tokens. All engines
are built in ONE process and stepped round-robin (A B C A B C ..., the shared harness
megatron_outeff/bench/harness.py), so drift of a shared machine falls on all variants alike; the
table prints each variant's median step time and its ratio to vanilla. The JSON (--output-json) is
rewritten after every round: a run stopped by a time limit keeps the steps it timed (meta.partial).

Outlier-metric overhead: the time of one OutlierMonitor measurement (forward hooks + attention-mass
probe on one micro-batch) divided by --outlier-interval training steps (the issue's target: <= 5%
at the default interval; 0 when disabled, since nothing is built then).

Peak memory: on CUDA, torch.cuda.max_memory_allocated over each variant's own steps. On CPU, the
peak resident set (VmHWM) of a fresh subprocess that builds the variant and runs a few steps.

Defaults: on CUDA the paper's OPT-125m at seq 2048, bf16, ZeRO-1 and MFU from --peak-tflops (H100 /
H200 SXM dense bf16 by the datasheet: 989); on CPU the demo's small OPT at seq 128, fp32. Results:
--output-json (device, versions, command, rows, targets) and --output-md.

Targets (megatron_outeff/bench/targets.py; meant for OPT-125m in bf16 on one H100/H200; computed on
any device, so that a CPU rehearsal exercises them, but only CUDA values mean anything): Softmax_1
tokens/s >= 0.98x vanilla; Softmax_1's MFU reported.

    python tools/bench_train.py [--steps 20] [--warmup 3] [--output-json tools/results/bench_train_cpu.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import time
from pathlib import Path

from megatron_outeff.utils.cli import OneLineArgumentParser, command, nonnegative_int, positive_float, positive_int

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_VARIANTS = ("vanilla", "softmax1", "gated softmax1")  # names in megatron_outeff.bench.variants


def base_overrides(cuda: bool, seq: int | None, micro_batch: int | None) -> tuple[str, list[str]]:
    """(config path, overrides) for the default shape of this device."""
    common = [
        "data.source=synthetic",
        "checkpoint.dir=",
        "logging.tensorboard_dir=",
        "logging.outlier_interval=0",
        "train.eval_interval=0",
        "model.arch_overrides.hidden_dropout=0.0",
    ]
    if cuda:
        seq, mb = seq or 2048, micro_batch or 8
        return str(ROOT / "configs/train/opt-125m-paper.yaml"), common + [
            f"data.seq_length={seq}",
            "model.arch_overrides.max_position_embeddings=2048",
            "precision.dtype=bf16",
            "parallel.zero_stage=1",
            f"parallel.micro_batch_size={mb}",
            f"parallel.global_batch_size={mb}",
        ]
    seq, mb = seq or 128, micro_batch or 16
    return str(ROOT / "configs/train/demo-shakespeare.yaml"), common + [
        f"data.seq_length={seq}",
        f"parallel.micro_batch_size={mb}",
        f"parallel.global_batch_size={mb}",
    ]


def build(cfg_path: str, overrides: list[str], variant: str):
    """One variant's (trainer, data source, config) through the training package's own builder."""
    from megatron_outeff.bench.variants import BENCH_VARIANTS, config_overrides
    from megatron_outeff.training.config import load_config
    from megatron_outeff.training.engine import build_trainer

    cfg = load_config(cfg_path, overrides + config_overrides(BENCH_VARIANTS[variant]))
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
    from megatron_outeff.bench.harness import peak_rss_mib
    from megatron_outeff.megatron.parallel import init_model_parallel, shutdown_distributed
    from megatron_outeff.training.step import train_step

    cfg_path, overrides = base_overrides(False, args.seq, args.micro_batch)
    init_model_parallel(1, 1, seed=1234)
    atexit.register(shutdown_distributed)  # megatron's gloo groups stopped before interpreter finalization
    trainer, data, _ = build(cfg_path, overrides, args.memory_probe)
    for _ in range(3):
        train_step(trainer, data.next_global_batch())
    print(json.dumps({"peak_mib": peak_rss_mib()}))


COLUMNS = [
    ("variant", "variant", ""),
    ("median step s", "median_step_s", ".4f"),
    ("tokens/s", "tokens_per_s", ".0f"),
    ("x vanilla throughput", "throughput_vs_vanilla", ".3f"),
    ("MFU", "mfu", ".3f"),
    ("peak MiB", "peak_memory_mib", ".0f"),
    ("outlier overhead", "outlier_overhead", ".4f"),
    ("timed steps", "steps_timed", ""),
    ("status", "status", ""),
]


def render(doc: dict) -> str:
    from megatron_outeff.bench.harness import markdown_table

    m = doc["meta"]
    lines = [
        f"# Training throughput ({m['device']})",
        "",
        f"Command: `{m['command']}`",
        "",
        f"Versions: {m['versions']}; shape: {m['shape']}; memory: {m['memory']}; outlier overhead: one "
        f"measurement per {m['outlier_interval']} steps; load average at start {m['loadavg_start']}, now "
        f"{m.get('loadavg_now')}{'; PARTIAL: stopped before every step was timed' if m['partial'] else ''}",
        "",
        markdown_table(doc["rows"], COLUMNS),
        "",
    ]
    lines.append(
        "Targets"
        + ("" if m["device_type"] == "cuda" else " (CPU: values meaningless)")
        + ": "
        + "; ".join(
            f"{t['target']}: {'-' if t['met'] is None else 'MET' if t['met'] else 'NOT MET'} ({t['value']:.3f})"
            for t in doc.get("targets", [])
        )
    )
    return "\n".join(lines) + "\n"


def rows_and_targets(
    samples, tokens_per_step, flops_per_token, peak_tflops, cuda, peak=None, probe_s=None, interval=None
):
    """Rows (one per variant, from the steps timed so far) and the target checks."""
    from megatron_outeff.bench.targets import check

    rows = []
    base = samples["vanilla"].median if "vanilla" in samples and samples["vanilla"].ok else None
    for name, s in samples.items():
        row = {"variant": name, "steps_timed": len(s.ms), "status": "ok" if s.ok else (s.error or "not timed yet")}
        if s.ok:
            med = s.median / 1e3
            tok_s = tokens_per_step / med
            row.update(
                median_step_s=med,
                tokens_per_s=tok_s,
                throughput_vs_vanilla=None if base is None else base / s.median,
                mfu=tok_s * flops_per_token / (peak_tflops * 1e12),
            )
        if peak is not None and peak.get(name) is not None:
            row["peak_memory_mib"] = peak[name]
        if probe_s is not None and name in probe_s and s.ok:
            row["outlier_probe_s"] = probe_s[name]
            row["outlier_overhead"] = probe_s[name] / (interval * row["median_step_s"])
        rows.append(row)
    sm1 = next((r for r in rows if r["variant"] == "softmax1"), {})
    targets = [
        check("opt125m_softmax1_tokens_per_s_vs_vanilla", sm1.get("throughput_vs_vanilla")),
        check("opt125m_softmax1_mfu", sm1.get("mfu")),
    ]
    return rows, [t for t in targets if t is not None]


@command
def main(argv=None) -> int:
    from megatron_outeff.bench.options import add_output_arguments  # no torch: --help stays instant

    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps per variant first")
    parser.add_argument("--seq", type=positive_int, default=None, help="sequence length (default: 2048 CUDA / 128 CPU)")
    parser.add_argument(
        "--micro-batch", type=positive_int, default=None, help="micro-batch size (default: 8 CUDA / 16 CPU)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help="names from megatron_outeff.bench.variants.BENCH_VARIANTS (vanilla first: the baseline)",
    )
    parser.add_argument(
        "--outlier-interval",
        type=positive_int,
        default=None,
        help="interval for the overhead figure (default: 1000 CUDA, the paper recipe's; 200 CPU, the demo's)",
    )
    parser.add_argument(
        "--peak-tflops", type=positive_float, default=989.0, help="device peak for MFU (dense bf16 TFLOP/s)"
    )
    add_output_arguments(parser)
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from megatron_outeff.bench.variants import select
    from megatron_outeff.errors import OutEffError

    try:
        select(args.variants)
    except ValueError as e:
        raise OutEffError(f"--variants: {e}") from None
    if "vanilla" not in args.variants:
        raise OutEffError(f"--variants {args.variants}: expected 'vanilla' among them (the baseline)")
    if args.memory_probe:
        memory_probe(args)
        return 0

    import torch

    from megatron_outeff.bench import harness
    from megatron_outeff.megatron.parallel import init_model_parallel, shutdown_distributed
    from megatron_outeff.training.step import train_step

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg_path, overrides = base_overrides(cuda, args.seq, args.micro_batch)
    interval = args.outlier_interval or (1000 if cuda else 200)
    meta = dict(
        harness.environment(device),
        steps=args.steps,
        warmup=args.warmup,
        outlier_interval=interval,
        variants=args.variants,
        shape={"config": os.path.relpath(cfg_path, ROOT), "overrides": overrides},
        peak_tflops=args.peak_tflops,
        memory="torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM) of a fresh process per variant",
    )
    report = harness.Report(args.output_json, args.output_md, meta, render=render)
    report.save(rows=[], targets=[])  # a file from the start: a cut run leaves what it has
    try:
        init_model_parallel(1, 1, seed=1234)
        atexit.register(shutdown_distributed)  # megatron's gloo groups stopped before interpreter finalization
        runs = {name: build(cfg_path, overrides, name) for name in args.variants}
    except KeyboardInterrupt:
        print(
            "interrupted while building the engines"
            + (f" (partial file {args.output_json})" if args.output_json else "")
        )
        return 130
    cfg = next(iter(runs.values()))[2]
    tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_length
    flops_per_token = model_flops_per_token(cfg)
    report.meta["shape"].update(
        global_batch=cfg.parallel.global_batch_size,
        seq_length=cfg.data.seq_length,
        dtype=cfg.precision.dtype,
        zero_stage=cfg.parallel.zero_stage,
    )
    report.meta["flops_per_token"] = flops_per_token

    def step(trainer, data):
        return lambda: train_step(trainer, data.next_global_batch())

    def save(_round, samples):
        rows, targets = rows_and_targets(
            samples,
            tokens_per_step,
            flops_per_token,
            args.peak_tflops,
            cuda,
            peak={n: s.peak_mib for n, s in samples.items()} if cuda else None,
        )
        report.save(rows=rows, targets=targets)

    try:
        samples = harness.round_robin(
            {name: step(t, d) for name, (t, d, _) in runs.items()},
            warmup=args.warmup,
            repeats=args.steps,
            device=device,
            rotate=False,
            track_cuda_peak=cuda,
            after_round=save,
        )
        peak = {n: s.peak_mib for n, s in samples.items()} if cuda else {n: cpu_peak_mib(n, args) for n in runs}
        probe_s = {name: outlier_probe_s(trainer, data, interval, cuda) for name, (trainer, data, _) in runs.items()}
    except KeyboardInterrupt:
        print("interrupted: partial results kept" + (f" in {args.output_json}" if args.output_json else ""))
        return 130
    rows, targets = rows_and_targets(
        samples, tokens_per_step, flops_per_token, args.peak_tflops, cuda, peak, probe_s, interval
    )
    doc = report.finish(rows=rows, targets=targets)
    print(render(doc))
    return 0


def cpu_peak_mib(name: str, args) -> float | None:
    """Peak RSS (MiB) of a fresh process that builds variant ``name`` and runs a few steps (CPU), or None."""
    cmd = (
        [sys.executable, __file__, "--memory-probe", name]
        + (["--seq", str(args.seq)] if args.seq else [])
        + (["--micro-batch", str(args.micro_batch)] if args.micro_batch else [])
    )
    # A fresh single-process group: drop the rendezvous variables this process set for itself.
    from megatron_outeff.bench.harness import probe_subprocess
    from megatron_outeff.megatron.parallel import single_process_env

    env = single_process_env()
    return probe_subprocess(cmd, env={**env, "PYTHONWARNINGS": "ignore"})


def outlier_probe_s(trainer, data, interval: int, cuda: bool) -> float:
    """Median seconds of one OutlierMonitor measurement (after a warm-up call), as the loop runs it."""
    import torch

    from megatron_outeff.training.outliers import OutlierMonitor
    from megatron_outeff.training.step import eval_loss

    monitor = OutlierMonitor(trainer.engine.module, interval)
    probe = data.next_global_batch()[:1]
    samples = []
    for _ in range(4):
        t0 = time.perf_counter()
        monitor.measure(lambda: eval_loss(trainer, probe))
        if cuda:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples[1:])


if __name__ == "__main__":
    sys.exit(main())
