#!/usr/bin/env python
"""Benchmark: one megatron-core TransformerLayer forward + backward per attention variant.

OPT-125m layer shape (hidden 768, 12 heads, FFN 3072). Every variant of the one benchmark list
(megatron_outeff/bench/variants.py, BENCH_VARIANTS) is timed in the same process as the vanilla
baseline, round-robin (each repetition runs every variant once, in a rotating order: the shared
harness, megatron_outeff/bench/harness.py), so that load drift on a shared machine hits all variants
alike; the median is reported with its ratio to our vanilla layer. megatron-core's own
DotProductAttention (vanilla and softmax_type='off-by-one') is timed too, as the reference point.
JSON (--output-json, default tools/results/bench_layer_<device>.json) is rewritten after every
round; a Markdown table goes beside it.

    python tools/bench_layer.py                       # CPU: seq 512, batch 1
    python tools/bench_layer.py --seq 2048 --batch 4  # GPU (CUDA: torch's fused kernels; Triton for clipped)
"""

from __future__ import annotations

import atexit
import os
import sys

import torch

from megatron_outeff.utils.cli import OneLineArgumentParser, command, nonnegative_int, positive_int

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MCORE = ("megatron DotProductAttention vanilla", "megatron DotProductAttention off-by-one")


def build_layers(args, device, dtype):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_outeff.bench.variants import BENCH_VARIANTS
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec

    def config(**kw):
        return TransformerConfig(
            num_layers=1,
            hidden_size=768,
            num_attention_heads=12,
            ffn_hidden_size=3072,
            use_cpu_initialization=device.type == "cpu",
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=device.type == "cuda",
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
            **kw,
        )

    layers = {
        name: build_module(get_outeff_layer_spec(v, seq_length=args.seq), config=config(), layer_number=1)
        for name, v in BENCH_VARIANTS.items()
    }
    layers[MCORE[0]] = build_module(get_gpt_layer_local_spec(), config=config(), layer_number=1)
    layers[MCORE[1]] = build_module(
        get_gpt_layer_local_spec(), config=config(softmax_type="off-by-one"), layer_number=1
    )
    return {k: m.to(device=device, dtype=dtype) for k, m in layers.items()}


COLUMNS = [
    ("variant", "variant", ""),
    ("median ms", "median_ms", ".1f"),
    ("min ms", "min_ms", ".1f"),
    ("median ratio", "ratio_to_vanilla", ".2f"),
    ("min ratio", "min_ratio_to_vanilla", ".2f"),
    ("status", "status", ""),
]


def render(doc: dict) -> str:
    from megatron_outeff.bench.harness import markdown_table

    m = doc["meta"]
    s = m["shape"]
    return (
        "\n".join(
            [
                f"# TransformerLayer forward+backward, OPT-125m shape (hidden 768, 12 heads, FFN 3072), seq {s['seq']}, "
                f"batch {s['batch']}, {m['dtype']}",
                "",
                f"Device: {m['device']}; versions {m['versions']}; median of {m['reps']} round-robin repetitions after "
                f"{m['warmup']} warm-up{' (PARTIAL)' if m['partial'] else ''}.",
                "",
                f"Command: `{m['command']}`",
                "",
                f"Load average at start {m['loadavg_start']}, now {m.get('loadavg_now')} (CPU count {m['cpu_count']}).",
                "",
                "Both ratios are to our vanilla layer. On a shared, loaded CPU (see the load average) differences under "
                "~15% are noise; the GPU run (--seq 2048) is the one to judge kernels by.",
                "",
                markdown_table(doc["rows"], COLUMNS),
            ]
        )
        + "\n"
    )


@command
def main(argv=None):
    from megatron_outeff.bench.options import add_output_arguments  # no torch: --help stays instant

    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=positive_int, default=None, help="sequence length (default 512 on CPU, 2048 on GPU)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size (default 1 on CPU, 4 on GPU)")
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--warmup", type=nonnegative_int, default=1)
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="float32 (CPU default) | bfloat16 (GPU default)",
    )
    add_output_arguments(
        p, json_default="tools/results/bench_layer_<device>.json", md_default="beside the JSON, .md for .json"
    )
    args = p.parse_args(argv)

    from megatron_outeff.bench import harness
    from megatron_outeff.megatron.parallel import init_model_parallel, shutdown_distributed

    init_model_parallel(1, 1, seed=1234)
    atexit.register(shutdown_distributed)  # megatron's gloo groups stopped before interpreter finalization
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.seq = args.seq or (2048 if cuda else 512)
    args.batch = args.batch or (4 if cuda else 1)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    layers = build_layers(args, device, dtype)
    x = torch.randn(args.seq, args.batch, 768, device=device, dtype=dtype)

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            h = x.detach().requires_grad_(True)
            out, _ = layer(h, attention_mask=None)
            out.float().sum().backward()

        return run

    out_json = args.output_json or os.path.join(
        ROOT, "tools", "results", f"bench_layer_{'gpu' if cuda else 'cpu'}.json"
    )
    meta = dict(
        harness.environment(device),
        dtype=str(dtype).replace("torch.", ""),
        reps=args.reps,
        warmup=args.warmup,
        shape={"hidden": 768, "heads": 12, "ffn": 3072, "seq": args.seq, "batch": args.batch},
        what="one TransformerLayer (local spec) forward + backward, input grad included",
    )
    out_md = args.output_md or os.path.splitext(out_json)[0] + ".md"
    report = harness.Report(out_json, out_md, meta, render=render)

    def rows(samples):
        out = []
        for name, s in samples.items():
            r = {"variant": name, "status": "ok" if s.ok else (s.error or "not timed yet")}
            if s.ok:
                r.update(
                    median_ms=s.median,
                    min_ms=s.min,
                    ratio_to_vanilla=harness.ratio(samples, name, "vanilla"),
                    min_ratio_to_vanilla=harness.ratio(samples, name, "vanilla", "min"),
                )
            out.append(r)
        return out

    fns = {name: step(layer) for name, layer in layers.items()}
    try:
        samples = harness.round_robin(
            fns,
            warmup=args.warmup,
            repeats=args.reps,
            device=device,
            after_round=lambda r, s: report.save(rows=rows(s)),
        )
    except KeyboardInterrupt:
        print(f"interrupted: partial results in {out_json}")
        return 130
    doc = report.finish(rows=rows(samples))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
