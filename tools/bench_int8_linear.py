"""Benchmark: fp32 vs real int8 (oneDNN, Int8Linear) on CPU, same process: the Linears, then a whole model.

    python tools/bench_int8_linear.py [--tokens 512] [--reps 20] [--threads 1 2]
        [--reduce-range auto|on|off] [--model] [--model-reps 5]

Linears: OPT-125m's shapes for one 512-token sequence (the LM head stays float in our scheme and is not
benchmarked). Median wall times and fp32 / int8 ratios (> 1: int8 faster), for the GEMM alone (input
already uint8) and for the full module (float input quantized on the fly), for each thread count in
turn (torch.set_num_threads in this process).

--model: the deployable W8A8 model against its fp32 model. A random-weight Hugging Face
OPTForCausalLM with OPT-125m's shape (transformers' OPTConfig defaults: 12 layers, hidden 768, FFN
3072, vocab 50272), calibrated on random tokens with `calibrate_w8a8_linears` (the parameters
`export_compressed_tensors_w8a8` writes), its Linears swapped for Int8Linear (`int8_model`; lm_head
float). Timed: one prefill forward of 1 x `tokens` tokens under torch.no_grad with logits_to_keep=1
(what generate() computes for a prompt), fp32 and int8 interleaved; tokens/s = tokens / median time.
Also printed: the relative error of the int8 model's logits and of the simulated compressed-tensors
W8A8 model's (simulate_w8a8_model: the same codes, float GEMMs) against fp32.
A benchmark, not a test: numbers depend on the CPU, its load (printed) and thread count. Timing,
interleaving and the device / load record are the shared harness's (megatron_outeff/bench/harness.py);
--output-json / --output-md write every row as it is measured.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
import torch.nn.functional as F

from megatron_outeff.bench import harness
from megatron_outeff.bench.options import add_output_arguments
from megatron_outeff.quant import calibrate_w8a8_linears, quantize_weight_per_channel, simulate_w8a8_model
from megatron_outeff.quant.int8_linear import Int8Linear, cpu_has_vnni, int8_model
from megatron_outeff.utils.cli import OneLineArgumentParser, command, positive_int

SHAPES = [  # (name, in_features, out_features)
    ("fc1 (768->3072)", 768, 3072),
    ("fc2 (3072->768)", 3072, 768),
    ("q/k/v/out_proj (768->768)", 768, 768),
]


def paired(fns: dict, reps: int) -> dict:
    """Median seconds per function, the functions interleaved rep by rep (harness.round_robin) so that a
    load change on a shared machine hits all of them alike."""
    samples = harness.round_robin(fns, warmup=2, repeats=reps, device=torch.device("cpu"), rotate=False)
    for name, s in samples.items():
        if not s.ok:
            raise RuntimeError(f"{name}: {s.error}")
    return {k: s.median / 1e3 for k, s in samples.items()}


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in (harness.loadavg() or []))


ROWS: list = []


def bench_linears(args, reduce_range) -> None:
    print(
        f"{'shape':28s} {'fp32 ms':>9s} {'int8 gemm ms':>13s} {'int8 module ms':>15s} {'ratio gemm':>11s} {'ratio module':>13s}"
    )
    for name, k, n in SHAPES:
        x = torch.randn(args.tokens, k)
        w = torch.randn(n, k) * 0.02
        b = torch.randn(n) * 0.02
        q, s = quantize_weight_per_channel(w)
        m = Int8Linear(q, s, input_scale=x.abs().max().item() / 127, bias=b, reduce_range=reduce_range)
        codes = m.quantize_input(x)
        with torch.no_grad():
            t = paired(  # the closures run inside this iteration
                {"fp": lambda: F.linear(x, w, b), "gemm": lambda: m.forward_codes(codes), "mod": lambda: m(x)},  # noqa: B023
                args.reps,
            )
            t_fp, t_gemm, t_mod = t["fp"], t["gemm"], t["mod"]
        print(
            f"{name:28s} {t_fp * 1e3:9.3f} {t_gemm * 1e3:13.3f} {t_mod * 1e3:15.3f} {t_fp / t_gemm:11.2f} {t_fp / t_mod:13.2f}"
            f"   (reduce_range={m.reduce_range})",
            flush=True,
        )
        ROWS.append(
            dict(
                what=name,
                threads=torch.get_num_threads(),
                fp32_ms=t_fp * 1e3,
                int8_gemm_ms=t_gemm * 1e3,
                int8_module_ms=t_mod * 1e3,
                ratio_gemm=t_fp / t_gemm,
                ratio_module=t_fp / t_mod,
                reduce_range=m.reduce_range,
            )
        )


def build_models(tokens: int, reduce_range):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(dropout=0.0, attention_dropout=0.0)).eval()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(2, model.config.vocab_size, (1, tokens), generator=gen) for _ in range(2)]
    with torch.no_grad():
        params = calibrate_w8a8_linears(model, lambda m: [m(c) for c in calib])
    return model, int8_model(model, params, reduce_range), simulate_w8a8_model(model, params)


def bench_model(args, model, qmodel, simulated) -> None:
    ids = torch.randint(2, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = {n: m(ids).logits.double() for n, m in (("fp32", model), ("int8", qmodel), ("sim", simulated))}
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        print(
            f"  logits, relative L2 error against fp32: int8 {rel(logits['int8'], logits['fp32']):.2e}, "
            f"simulated W8A8 {rel(logits['sim'], logits['fp32']):.2e} (int8 vs simulated "
            f"{rel(logits['int8'], logits['sim']):.2e}: per Linear they agree to fp32 rounding, but a 1e-6 "
            f"difference upstream moves values across rounding ties downstream)"
        )
        t = paired(
            {"fp32": lambda: model(ids, logits_to_keep=1), "int8": lambda: qmodel(ids, logits_to_keep=1)},
            args.model_reps,
        )
    tps = {k: args.tokens / v for k, v in t.items()}
    ROWS.append(
        dict(
            what=f"whole model, prefill 1 x {args.tokens}",
            threads=torch.get_num_threads(),
            fp32_ms=t["fp32"] * 1e3,
            int8_module_ms=t["int8"] * 1e3,
            ratio_module=t["fp32"] / t["int8"],
        )
    )
    print(
        f"  prefill 1 x {args.tokens}: fp32 {tps['fp32']:8.1f} tokens/s ({t['fp32'] * 1e3:.0f} ms), "
        f"int8 {tps['int8']:8.1f} tokens/s ({t['int8'] * 1e3:.0f} ms), int8 / fp32 {tps['int8'] / tps['fp32']:.2f}x; {load()}",
        flush=True,
    )


@command
def main(argv=None) -> None:
    ap = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=positive_int, default=512)
    ap.add_argument("--reps", type=positive_int, default=20)
    ap.add_argument(
        "--threads",
        type=positive_int,
        nargs="+",
        default=None,
        help="torch thread counts, measured in turn (default: torch's)",
    )
    ap.add_argument(
        "--reduce-range",
        choices=["auto", "on", "off"],
        default="auto",
        help="7-bit activations: auto = unless the CPU has VNNI",
    )
    ap.add_argument("--model", action="store_true", help="also measure the whole OPT-125m-shaped model")
    ap.add_argument("--model-reps", type=positive_int, default=5)
    add_output_arguments(ap)
    args = ap.parse_args(argv)
    meta = dict(
        harness.environment(torch.device("cpu"), modules=("transformers",)),
        cpu_has_vnni=cpu_has_vnni(),
        tokens=args.tokens,
        reps=args.reps,
    )
    report = harness.Report(args.output_json, args.output_md, meta, render=render)
    reduce_range = {"auto": None, "on": True, "off": False}[args.reduce_range]
    torch.manual_seed(0)
    models = build_models(args.tokens, reduce_range) if args.model else None
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        print(
            f"\ntorch {torch.__version__}, {platform.processor() or platform.machine()}, capability "
            f"{torch.backends.cpu.get_cpu_capability()}, VNNI {cpu_has_vnni()}, threads {torch.get_num_threads()}, "
            f"tokens {args.tokens}, median of {args.reps} interleaved reps; {load()}",
            flush=True,
        )
        bench_linears(args, reduce_range)
        report.save(rows=ROWS)
        if models:
            print(f"whole model (OPT-125m shape, random weights, lm_head fp32), median of {args.model_reps}:")
            bench_model(args, *models)
            report.save(rows=ROWS)
    report.finish(rows=ROWS)


COLUMNS = [
    ("what", "what", ""),
    ("threads", "threads", ""),
    ("fp32 ms", "fp32_ms", ".3f"),
    ("int8 GEMM ms", "int8_gemm_ms", ".3f"),
    ("int8 module ms", "int8_module_ms", ".3f"),
    ("fp32 / int8 GEMM", "ratio_gemm", ".2f"),
    ("fp32 / int8 module", "ratio_module", ".2f"),
]


def render(doc: dict) -> str:
    m = doc["meta"]
    return (
        f"# fp32 vs int8 Linear ({m['device']}, capability {m['cpu_capability']}, VNNI {m['cpu_has_vnni']})\n\n"
        f"Command: `{m['command']}`; versions {m['versions']}; load average at start {m['loadavg_start']}, "
        f"now {m.get('loadavg_now')}.\n\n" + harness.markdown_table(doc["rows"], COLUMNS) + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
