"""Benchmark: fp32 Linear vs real int8 Linear (oneDNN, Int8Linear) on CPU, same process.

    PYTHONPATH=$PWD python tools/bench_int8_linear.py [--tokens 512] [--reps 20] [--threads N] [--reduce-range auto|on|off]

Shapes: OPT-125m's Linears for one 512-token sequence (the LM head stays float in our scheme and is
not benchmarked). Reports median wall times and fp32 / int8 ratios (> 1: int8 faster), for the GEMM
alone (input already uint8) and for the full module (float input quantized on the fly).
A benchmark, not a test: numbers depend on the CPU, its load and thread count.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_outeff.quant import quantize_weight_per_channel
from megatron_outeff.quant.int8_linear import Int8Linear, cpu_has_vnni
from megatron_outeff.utils.cli import OneLineArgumentParser, positive_int

SHAPES = [  # (name, in_features, out_features)
    ("fc1 (768->3072)", 768, 3072),
    ("fc2 (3072->768)", 3072, 768),
    ("q/k/v/out_proj (768->768)", 768, 768),
]


def paired(fns: dict, reps: int) -> dict:
    """Median time per function, the functions interleaved rep by rep so that a load change on a
    shared machine hits all of them alike."""
    for f in fns.values():
        f(), f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, default=512)
    ap.add_argument("--reps", type=positive_int, default=20)
    ap.add_argument("--threads", type=positive_int, default=None)
    ap.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto",
                    help="7-bit activations: auto = unless the CPU has VNNI")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, VNNI {cpu_has_vnni()}, threads {torch.get_num_threads()}, "
          f"tokens {args.tokens}, median of {args.reps} interleaved reps; load average {os.getloadavg()[0]:.1f}")
    print(f"{'shape':28s} {'fp32 ms':>9s} {'int8 gemm ms':>13s} {'int8 module ms':>15s} {'ratio gemm':>11s} {'ratio module':>13s}")
    for name, k, n in SHAPES:
        x = torch.randn(args.tokens, k)
        w = torch.randn(n, k) * 0.02
        b = torch.randn(n) * 0.02
        q, s = quantize_weight_per_channel(w)
        m = Int8Linear(q, s, input_scale=x.abs().max().item() / 127, bias=b,
                         reduce_range={"auto": None, "on": True, "off": False}[args.reduce_range])
        codes = m.quantize_input(x)
        with torch.no_grad():
            t = paired({"fp": lambda: F.linear(x, w, b), "gemm": lambda: m.forward_codes(codes), "mod": lambda: m(x)}, args.reps)
            t_fp, t_gemm, t_mod = t["fp"], t["gemm"], t["mod"]
        print(f"{name:28s} {t_fp * 1e3:9.3f} {t_gemm * 1e3:13.3f} {t_mod * 1e3:15.3f} {t_fp / t_gemm:11.2f} {t_fp / t_mod:13.2f}"
              f"   (reduce_range={m.reduce_range})")


if __name__ == "__main__":
    main()
