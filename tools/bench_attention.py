#!/usr/bin/env python
"""Attention benchmark: outlier-efficient attention against torch SDPA and megatron-core, same process.

Not a test. Prints a table and writes JSON after every shape (device, versions, load, SDPA's backend;
per method: forward and forward+backward time, peak memory, ratio to SDPA vanilla, the kernel that
ran), through the shared harness (megatron_outeff/bench/harness.py) with the one list of benchmarked
variants (megatron_outeff/bench/variants.py).

Methods (causal self-attention, q/k/v [b, s, h, d]):
  sdpa_vanilla             torch.nn.functional.scaled_dot_product_attention (the baseline, ratio 1.0)
  mcore_offbyone           megatron-core's off-by-one path: Q K^T -> FusedScaleMaskSoftmax
                           (scaled_masked_softmax_fusion=False, attention_mask_func, explicit causal
                           mask, softmax_offset = zeros[h]) -> P V
  outeff_softmax1          variant "softmax1", impl="auto" (torch's fused kernels + the sink: CUDA and CPU)
  outeff_learnable         variant "learnable" (offset [h] requiring grad), impl="auto"
  outeff_gated             variant "gated softmax1" (a per-head gate [b, s, h] requiring grad), impl="auto"
  outeff_clipped           variant "clipped softmax1" (alpha 12: gamma = -12 / s), impl="auto"
                           (CUDA: the Triton flash kernel; CPU: the lean materialised path)
  outeff_softmax1_torch    "softmax1", impl="torch" (the materialised PyTorch reference)
  outeff_clipped_torch     "clipped softmax1", impl="torch"
  outeff_softmax1_triton   "softmax1", impl="triton" (our Triton flash kernel, for comparison)
  outeff_clipped_triton    "clipped softmax1", impl="triton"
  outeff_softmax1_rowwise  "softmax1", impl="rowwise" (matmuls + the fused Triton row softmax)
Triton methods are skipped off CUDA unless --interpret (a rehearsal of the GPU run: times mean nothing).
The SDPA backend: torch._fused_sdp_choice for the baseline's arguments is recorded per shape
(``sdpa_backend``), and each outeff method's kernel (``kernel``, ops.sdpa_attention.sdpa_backend_record);
our sdpa methods make the same choice for the same arguments, so both use the same backend
(``same_backend``). --sdpa-backend pins both (torch.nn.attention.sdpa_kernel).

Shapes: every (d, sq) of --d x --sq, the headline shapes (d 128 with sq 4096 and 16384) first, so that
a run stopped by a time limit has them. CUDA default: bf16, d 128 and 64, sq 4096 16384 2048 8192,
b = 16384 // sq, h = 2048 // d. CPU default: fp32, d 64, sq 512-4096, b 1, h 8.

Timing: harness.round_robin, `warmup` untimed calls then `repeats` timed ones, median (and min)
reported; forward under no_grad, forward+backward = forward then out.backward(grad). CPU: round-robin
(every method of a shape once per round); CUDA: one method after the other (--interleave overrides).
Peak memory: CUDA: max_memory_allocated during one forward+backward minus what was allocated before;
CPU: approximate, the peak RSS growth of a fresh subprocess running one forward+backward (after a
tiny warm-up call), as an order of magnitude.

Targets: megatron_outeff/bench/targets.py (CUDA: issue 20's, checked on CUDA or with --interpret;
CPU: C1-C4, checked on CPU).

Usage:
  python tools/bench_attention.py                          # defaults for the device found
  python tools/bench_attention.py --sq 4096 --d 128 --dtype bf16 --repeats 20 --output-json r.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

from megatron_outeff.utils.cli import OneLineArgumentParser, command, nonnegative_int, positive_int

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BASELINES = ("sdpa_vanilla", "mcore_offbyone")
# method -> (variant name in megatron_outeff.bench.variants.BENCH_VARIANTS, impl)
OUTEFF = {
    "outeff_softmax1": ("softmax1", "auto"),
    "outeff_learnable": ("learnable", "auto"),
    "outeff_gated": ("gated softmax1", "auto"),
    "outeff_clipped": ("clipped softmax1", "auto"),
    "outeff_softmax1_torch": ("softmax1", "torch"),
    "outeff_clipped_torch": ("clipped softmax1", "torch"),
    "outeff_softmax1_triton": ("softmax1", "triton"),
    "outeff_clipped_triton": ("clipped softmax1", "triton"),
    "outeff_softmax1_rowwise": ("softmax1", "rowwise"),
}
METHODS = list(BASELINES) + list(OUTEFF)
TRITON_IMPLS = ("triton", "rowwise")
DEFAULT_METHODS = {
    "cuda": ["sdpa_vanilla", "mcore_offbyone", "outeff_softmax1", "outeff_learnable", "outeff_gated", "outeff_clipped"],
    "cpu": [
        "sdpa_vanilla",
        "mcore_offbyone",
        "outeff_softmax1",
        "outeff_learnable",
        "outeff_clipped",
        "outeff_clipped_torch",
    ],
}
HEADLINE = ((128, 4096), (128, 16384))  # (d, sq) measured first
# bytes per score-matrix element a materialised method keeps alive in forward+backward (estimate,
# used to skip shapes that would not fit)
MATERIALISED_BYTES = {
    "mcore_offbyone": 24,
    "outeff_softmax1_torch": 24,
    "outeff_clipped_torch": 28,
    "outeff_softmax1_rowwise": 10,
}
CPU_CLIPPED_BYTES = 12  # outeff_clipped on CPU: one [sq, sk] buffer


class Unavailable(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# the methods: each returns a closure out = f() over fixed inputs q, k, v [b, s, h, d]
# ------------------------------------------------------------------------------------------------
def build_method(name: str, q, k, v) -> Callable[[], torch.Tensor]:
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    if name == "sdpa_vanilla":

        def f():  # SDPA wants [b, h, s, d]: the transposed views a [b, s, h, d] model passes
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)

        return f
    if name == "mcore_offbyone":
        try:
            from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
            from megatron.core.transformer.enums import AttnMaskType
            from megatron.core.transformer.utils import attention_mask_func
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"{type(e).__name__}: {e}") from None
        fsm = FusedScaleMaskSoftmax(
            input_in_fp16=q.dtype == torch.float16,
            input_in_bf16=q.dtype == torch.bfloat16,
            attn_mask_type=AttnMaskType.causal,
            scaled_masked_softmax_fusion=False,
            mask_func=attention_mask_func,
            softmax_in_fp32=True,
            scale=scale,
        )
        mask = (
            torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1).view(1, 1, s, s)
        )  # its default is built on "cuda"
        offset = torch.zeros(h, device=q.device)

        def f():
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            p = fsm(qt @ kt.transpose(-1, -2), mask, softmax_offset=offset)
            return (p.to(vt.dtype) @ vt).transpose(1, 2)

        return f
    from megatron_outeff.bench.variants import BENCH_VARIANTS, attention_kwargs
    from megatron_outeff.ops import outeff_attention

    variant, impl = OUTEFF[name]
    kw = attention_kwargs(
        BENCH_VARIANTS[variant], b=b, s=s, h=h, device=q.device, dtype=q.dtype, requires_grad=q.requires_grad
    )

    def f():
        return outeff_attention(q, k, v, impl=impl, **kw)

    return f


def _materialised_bytes(method: str, device_type: str) -> int:
    if method == "outeff_clipped" and device_type == "cpu":
        return CPU_CLIPPED_BYTES
    return MATERIALISED_BYTES.get(method, 0)


# ------------------------------------------------------------------------------------------------
# inputs, memory probe (CPU)
# ------------------------------------------------------------------------------------------------
def make_inputs(b, s, h, d, dtype, device, requires_grad=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [
        torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for _ in range(3)
    ]


def fwd_bwd(f, q, k, v, grad):
    def run():
        for t in (q, k, v):
            t.grad = None
        f().backward(grad)

    return run


def memprobe_main(args) -> int:
    """Child process (CPU): one forward+backward of one method; prints {"peak_mib": ...}."""
    from megatron_outeff.bench import harness

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, b, s, h, d = DTYPES[args.dtype[0]], args.b, args.sq[0], args.h, args.d[0]
    tq, tk, tv = make_inputs(1, 16, h, d, dtype, "cpu")  # library / thread-pool start-up
    fwd_bwd(build_method(args.memprobe, tq, tk, tv), tq, tk, tv, torch.randn_like(tq))()
    del tq, tk, tv
    q, k, v = make_inputs(b, s, h, d, dtype, "cpu")
    run = fwd_bwd(build_method(args.memprobe, q, k, v), q, k, v, torch.randn(b, s, h, d, dtype=dtype))
    harness.reset_peak_rss()
    before = harness.rss_mib()
    run()
    print(json.dumps({"peak_mib": max(harness.peak_rss_mib() - before, 0.0)}))
    return 0


def cpu_peak_mib(method, b, s, h, d, dtype_name, threads) -> Optional[float]:
    from megatron_outeff.bench import harness

    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memprobe",
        method,
        "--b",
        str(b),
        "--h",
        str(h),
        "--sq",
        str(s),
        "--d",
        str(d),
        "--dtype",
        dtype_name,
    ] + (["--threads", str(threads)] if threads else [])
    return harness.probe_subprocess(cmd)


# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------
def _by_shape(results):
    by = {}
    for r in results:
        by.setdefault((r["dtype"], r["d"]), {}).setdefault(r["sq"], {})[r["method"]] = r
    return by


def _ok(r) -> bool:
    return r is not None and r.get("status") == "ok"


def check_targets(results: List[Dict]) -> List[Dict]:
    """The CUDA targets (megatron_outeff.bench.targets.GPU_TARGETS) from this benchmark's rows."""
    from megatron_outeff.bench.targets import check

    checks = []
    for (dt, d), per_sq in sorted(_by_shape(results).items()):
        for sq, m in sorted(per_sq.items()):
            where = dict(dtype=dt, d=d, sq=sq)
            for key, method in (
                ("softmax1_fwdbwd_vs_sdpa", "outeff_softmax1"),
                ("learnable_fwdbwd_vs_sdpa", "outeff_learnable"),
                ("gated_fwdbwd_vs_sdpa", "outeff_gated"),
                ("clipped_fwdbwd_vs_sdpa", "outeff_clipped"),
            ):
                r = m.get(method)
                if _ok(r):
                    checks.append(check(key, r.get("ratio_fwdbwd"), **where, kernel=r.get("kernel")))
            fl, mc = m.get("outeff_softmax1"), m.get("mcore_offbyone")
            if _ok(fl) and _ok(mc):
                checks.append(
                    check("softmax1_speedup_vs_mcore_offbyone_s4096", mc["fwdbwd_ms"] / fl["fwdbwd_ms"], **where)
                )
        # memory linear in sq: peak per sequence grows <= 2.5x per doubling (2x = linear)
        sqs = sorted(
            s for s in per_sq if _ok(per_sq[s].get("outeff_softmax1")) and per_sq[s]["outeff_softmax1"].get("peak_mib")
        )
        if len(sqs) >= 2:
            worst = 0.0
            for s0, s1 in zip(sqs, sqs[1:]):
                r0, r1 = per_sq[s0]["outeff_softmax1"], per_sq[s1]["outeff_softmax1"]
                growth = (r1["peak_mib"] / r1["b"]) / max(r0["peak_mib"] / r0["b"], 1e-9)
                worst = max(worst, growth ** (1.0 / math.log2(s1 / s0)))
            checks.append(check("softmax1_memory_growth_per_doubling_s", worst, dtype=dt, d=d, sq=None))
    return [c for c in checks if c is not None]


def check_cpu_targets(results: List[Dict]) -> List[Dict]:
    """C1-C4 (megatron_outeff.bench.targets.CPU_TARGETS) from the CPU rows."""
    from megatron_outeff.bench.targets import check

    checks = []
    for (dt, d), per_sq in sorted(_by_shape(results).items()):
        for sq, m in sorted(per_sq.items()):
            where = dict(dtype=dt, d=d, sq=sq)
            base = m.get("sdpa_vanilla")
            for name, c1, c3 in (
                ("outeff_softmax1", "C1_softmax1_fwdbwd_vs_sdpa", "C3_softmax1_memory_vs_sdpa"),
                ("outeff_learnable", "C1_learnable_fwdbwd_vs_sdpa", "C3_learnable_memory_vs_sdpa"),
            ):
                r = m.get(name)
                if not (_ok(r) and _ok(base)):
                    continue
                checks.append(check(c1, r.get("ratio_fwdbwd"), **where))
                if r.get("peak_mib") is not None and base.get("peak_mib"):
                    checks.append(check(c3, r["peak_mib"] / base["peak_mib"], **where))
            new, old = m.get("outeff_clipped"), m.get("outeff_clipped_torch")
            if _ok(new) and _ok(old):
                checks.append(check("C4_clipped_vs_reference_clipped", new["fwdbwd_ms"] / old["fwdbwd_ms"], **where))
            mc, oc = m.get("mcore_offbyone"), m.get("outeff_softmax1")
            if _ok(mc) and _ok(oc):
                checks.append(
                    check("C2_softmax1_speedup_vs_mcore_offbyone_s2048", mc["fwdbwd_ms"] / oc["fwdbwd_ms"], **where)
                )
    return [c for c in checks if c is not None]


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
COLUMNS = [
    ("dtype", "dtype", ""),
    ("b", "b", ""),
    ("h", "h", ""),
    ("sq", "sq", ""),
    ("d", "d", ""),
    ("method", "method", ""),
    ("kernel", "kernel", ""),
    ("fwd ms", "fwd_ms", ".2f"),
    ("fwd+bwd ms", "fwdbwd_ms", ".2f"),
    ("peak MiB", "peak_mib", ".0f"),
    ("fwd x SDPA", "ratio_fwd", ".3f"),
    ("fwd+bwd x SDPA", "ratio_fwdbwd", ".3f"),
    ("fwd+bwd TFLOP/s", "tflops_fwdbwd", ".1f"),
    ("status", "status", ""),
]


def render(doc: dict) -> str:
    from megatron_outeff.bench.harness import markdown_table

    meta = doc["meta"]
    lines = [
        f"# Attention benchmark ({meta['device']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Versions: {meta['versions']}",
        "",
        f"Timer: {meta['timer']}, median of {meta['config']['repeats']} after {meta['config']['warmup']} warm-up"
        f"{', methods round-robin' if meta['interleaved'] else ''}. Peak memory: {meta['memory']}. "
        f"SDPA backend per shape (torch._fused_sdp_choice for the baseline): {meta.get('sdpa_backends')}; "
        f"pinned: {meta.get('sdpa_backend_pin')}.",
        "",
        f"Load average (1/5/15 min) at start {meta['loadavg_start']}, now {meta.get('loadavg_now')} on "
        f"{meta['cpu_count']} logical cores{'; PARTIAL: stopped before every shape was measured' if meta['partial'] else ''}.",
        "",
        markdown_table(doc["results"], COLUMNS),
    ]
    checks = doc.get("targets") or []
    if checks:
        lines += ["", "Targets:", ""]
        lines += [
            f"- {'-' if c['met'] is None else 'MET' if c['met'] else 'NOT MET'}: {c['target']} "
            f"[{c.get('dtype')} d={c.get('d')} sq={c.get('sq')}] value {c['value']:.3f}"
            for c in checks
        ]
    return "\n".join(lines) + "\n"


def shape_order(ds, sqs):
    """(d, sq) pairs, the headline shapes first, then d by d in the given order."""
    pairs = [(d, s) for d in ds for s in sqs]
    return [p for p in HEADLINE if p in pairs] + [p for p in pairs if p not in HEADLINE]


def sdpa_choice_name(q, k, v) -> str:
    """Which backend torch's SDPA picks for the baseline's arguments (CUDA; "cpu_flash"/"math" on CPU)."""
    names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
    try:
        c = int(torch._fused_sdp_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.0, True))
    except RuntimeError as e:
        return f"none ({str(e).splitlines()[0][:60]})"
    name = names.get(c, str(c))
    return f"cpu_{name}" if q.device.type == "cpu" and name == "flash" else name


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
@command
def main(argv=None):
    from megatron_outeff.bench.options import add_output_arguments  # no torch: --help stays instant

    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sq", type=positive_int, nargs="+", help="sequence lengths (sq = sk, causal)")
    p.add_argument("--d", type=positive_int, nargs="+", help="head dims")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="dtypes")
    p.add_argument("--b", type=positive_int, help="batch (default CUDA: tokens // sq; CPU: 1)")
    p.add_argument("--h", type=positive_int, help="heads (default CUDA: hidden // d; CPU: 8)")
    p.add_argument("--tokens", type=positive_int, help="CUDA default b = tokens // sq (16384)")
    p.add_argument("--hidden", type=positive_int, help="CUDA default h = hidden // d (2048)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="default: per device (see --help)")
    p.add_argument("--warmup", type=nonnegative_int)
    p.add_argument("--repeats", type=positive_int)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the methods round-robin, one call each per round (default: on CPU only)",
    )
    p.add_argument(
        "--sdpa-backend",
        choices=["auto", "flash", "efficient", "cudnn"],
        default="auto",
        help="pin torch's SDPA backend for the baseline and our sdpa methods (default: SDPA's choice)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    add_output_arguments(p, json_default="tools/results/bench_attention_<device>.json")
    p.add_argument(
        "--interpret",
        action="store_true",
        help="CPU only: run the Triton methods under the Triton interpreter (a rehearsal: times mean nothing)",
    )
    p.add_argument("--memprobe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.interpret:  # before megatron_outeff.ops is imported (kernels are decorated at import)
        os.environ["TRITON_INTERPRET"] = "1"
    if args.memprobe:
        return memprobe_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron_outeff.bench import harness
    from megatron_outeff.ops import sdpa_attention

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = (
        dict(
            sq=[4096, 16384, 2048, 8192],
            d=[128, 64],
            dtype=["bf16"],
            b=None,
            h=None,
            tokens=16384,
            hidden=2048,
            warmup=3,
            repeats=10,
        )
        if cuda
        else dict(
            sq=[512, 1024, 2048, 4096], d=[64], dtype=["fp32"], b=1, h=8, tokens=None, hidden=None, warmup=2, repeats=7
        )
    )
    for key in ("sq", "d", "dtype", "b", "h", "tokens", "hidden", "warmup", "repeats"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if not cuda:
        cfg["b"], cfg["h"] = cfg["b"] or 1, cfg["h"] or 8
    methods = args.methods or DEFAULT_METHODS[device.type]
    total_mem = (
        torch.cuda.get_device_properties(device).total_memory
        if cuda
        else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    )
    interleave = (not cuda) if args.interleave is None else args.interleave
    pin = contextlib.nullcontext()
    if args.sdpa_backend != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        pin = sdpa_kernel(
            [
                {
                    "flash": SDPBackend.FLASH_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "cudnn": SDPBackend.CUDNN_ATTENTION,
                }[args.sdpa_backend]
            ]
        )
    meta = dict(
        harness.environment(device),
        config=cfg,
        methods=methods,
        variants={m: OUTEFF[m] for m in methods if m in OUTEFF},
        timer="torch.cuda.Event" if cuda else "time.perf_counter",
        interleaved=interleave,
        triton_interpreter=bool(args.interpret),
        sdpa_backend_pin=args.sdpa_backend,
        sdpa_backends={},
        memory=(
            "torch.cuda.max_memory_allocated minus allocated before (MiB)"
            if cuda
            else "approximate: peak RSS (VmHWM) of a subprocess running one fwd+bwd minus its RSS before (MiB)"
        ),
    )
    out_json = args.output_json or os.path.join(ROOT, "tools", "results", f"bench_attention_{device.type}.json")
    report = harness.Report(out_json, args.output_md, meta, render=render)
    results: List[Dict] = []
    report.save(results=results, targets=[])  # a file from the start: a cut run leaves what it has
    print(f"device: {meta['device']}\nversions: {meta['versions']}", flush=True)

    def all_checks():
        checks = check_targets(results) if (cuda or args.interpret) else []
        return checks + ([] if cuda else check_cpu_targets(results))

    try:
        with pin:
            for dt_name in cfg["dtype"]:
                for d, sq in shape_order(cfg["d"], cfg["sq"]):
                    measure_shape(
                        args,
                        cfg,
                        device,
                        total_mem,
                        interleave,
                        methods,
                        dt_name,
                        d,
                        sq,
                        results,
                        meta,
                        sdpa_attention,
                        harness,
                    )
                    report.save(results=results, targets=all_checks())
    except KeyboardInterrupt:  # a time limit's SIGINT: keep what was measured
        for r in results:
            r.setdefault("status", "interrupted")
        report.save(results=results, targets=all_checks())
        print(f"interrupted: partial results in {out_json}", flush=True)
        return 130
    doc = report.finish(results=results, targets=all_checks())
    print("\n" + render(doc))
    print(f"wrote {out_json}" + (f" and {args.output_md}" if args.output_md else ""))
    return 0


def measure_shape(
    args, cfg, device, total_mem, interleave, methods, dt_name, d, sq, results, meta, sdpa_attention, harness
) -> None:
    """Time every method at one shape (round-robin), append its rows to ``results``."""
    from megatron_outeff.bench.variants import attention_flops

    cuda = device.type == "cuda"
    dtype = DTYPES[dt_name]
    b = cfg["b"] or max(1, cfg["tokens"] // sq)  # b * sq (tokens) fixed on CUDA
    h = cfg["h"] or max(1, cfg["hidden"] // d)  # h * d (hidden) fixed on CUDA
    q, k, v = make_inputs(b, sq, h, d, dtype, device)
    grad = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    backend = sdpa_choice_name(q, k, v)
    meta["sdpa_backends"][f"{dt_name} d={d} sq={sq}"] = backend
    rows, fns = {}, {}
    for method in methods:
        row = rows[method] = dict(dtype=dt_name, b=b, h=h, sq=sq, d=d, method=method, sdpa_backend=backend)
        results.append(row)
        impl = OUTEFF.get(method, (None, None))[1]
        if impl in TRITON_IMPLS and not cuda and not args.interpret:
            row["status"] = "skipped: CUDA only (interpreter timings are meaningless)"
            continue
        need = _materialised_bytes(method, device.type) * b * h * sq * sq
        if need > 0.6 * total_mem:
            row["status"] = f"skipped: needs ~{need / 2**30:.0f} GiB (score matrix materialised)"
            continue
        try:
            f = build_method(method, q, k, v)
            sdpa_attention.sdpa_backend_record(reset=True)
            with torch.no_grad():
                f()  # compiles, probes; says which kernel ran
            row["kernel"] = _kernel(method, sdpa_attention.sdpa_backend_record()["last"], backend, device, dtype, d)
            if method in OUTEFF and row["kernel"]:
                row["same_backend"] = row["kernel"].split("+")[0] == backend
            fns[f"{method}/fwd"] = lambda f=f: _no_grad(f)
            fns[f"{method}/fwdbwd"] = fwd_bwd(f, q, k, v, grad)
        except Unavailable as e:
            row["status"] = f"unavailable: {e}"
        except Exception as e:  # noqa: BLE001  (report, keep benchmarking)
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if cuda:
            torch.cuda.empty_cache()
    samples = harness.round_robin(
        fns, warmup=cfg["warmup"], repeats=cfg["repeats"], device=device, interleave=interleave
    )
    for method, row in rows.items():
        if "status" in row:
            continue
        fwd, fb = samples[f"{method}/fwd"], samples[f"{method}/fwdbwd"]
        if not (fwd.ok and fb.ok):
            row["status"] = fwd.error or fb.error
            continue
        row.update(
            fwd_ms=fwd.median,
            fwdbwd_ms=fb.median,
            fwd_min_ms=fwd.min,
            fwdbwd_min_ms=fb.min,
            status="ok",
            tflops_fwdbwd=attention_flops(b, sq, h, d) / (fb.median * 1e9),
        )
        if not args.no_memory:
            try:
                row["peak_mib"] = (
                    harness.cuda_peak_mib(fns[f"{method}/fwdbwd"], device)
                    if cuda
                    else cpu_peak_mib(method, b, sq, h, d, dt_name, args.threads)
                )
            except torch.cuda.OutOfMemoryError:
                row["peak_mib"] = None
    base = rows.get("sdpa_vanilla")
    for method, row in rows.items():
        if _ok(base) and _ok(row):
            row["ratio_fwd"] = row["fwd_ms"] / base["fwd_ms"]
            row["ratio_fwdbwd"] = row["fwdbwd_ms"] / base["fwdbwd_ms"]
        print(
            f"  {dt_name} b={b} h={h} sq={sq} d={d} {method:24s} kernel {str(row.get('kernel')):22s} "
            f"fwd {row.get('fwd_ms', float('nan')):9.2f} ms  fwd+bwd {row.get('fwdbwd_ms', float('nan')):9.2f} ms  "
            f"peak {row.get('peak_mib') if row.get('peak_mib') is None else round(row['peak_mib'])} MiB  "
            f"x SDPA {row.get('ratio_fwdbwd', float('nan')):.3f}  {row['status']}",
            flush=True,
        )


def _kernel(method, recorded, backend, device, dtype, d) -> str:
    """What ran: SDPA's backend (baseline), our sdpa path's recorded kernel, or the impl that ran."""
    if method == "sdpa_vanilla":
        return backend
    if method not in OUTEFF:
        return "materialised"
    from megatron_outeff.bench.variants import BENCH_VARIANTS
    from megatron_outeff.ops.dispatch import auto_impl

    variant, impl = OUTEFF[method]
    v = BENCH_VARIANTS[variant]
    if impl == "auto":
        impl = auto_impl(device.type, v.softmax, v.clipped, False, dtype, d, "causal")
    return (recorded or "?") if impl == "sdpa" else impl


def _no_grad(f):
    with torch.no_grad():
        return f()


if __name__ == "__main__":
    sys.exit(main())
