#!/usr/bin/env python
"""Attention benchmark: outlier-efficient attention against torch SDPA and megatron-core.

Not a test. Prints a table and writes JSON (device, torch / triton / megatron-core versions, shapes,
dtype and, per method: forward time, forward+backward time, peak memory, ratio vs torch SDPA vanilla
measured in the same process).

Methods (all causal self-attention, q/k/v [b, s, h, d]):
  sdpa_vanilla          torch.nn.functional.scaled_dot_product_attention (the baseline, ratio 1.0)
  mcore_offbyone        megatron-core's off-by-one path: Q K^T -> FusedScaleMaskSoftmax
                        (scaled_masked_softmax_fusion=False, attention_mask_func, explicit causal bool
                        mask, softmax_offset = zeros[h]) -> P V
  outeff_cpu            megatron_outeff, Softmax_1, impl="auto" on CPU = "sdpa" (torch's fused CPU flash
                        kernel + the sink as a sigmoid(lse - a_h) rescale, ops/sdpa_attention.py)  CPU only
  outeff_cpu_learnable  the same with softmax="learnable" (offset [h] requiring grad)           CPU only
  outeff_cpu_clipped    Softmax_1 with the clip, impl="auto" on CPU = "cpu": the lean materialised
                        clipped path (one [sq, sk] buffer, only P saved)                       CPU only
  outeff_torch          megatron_outeff, Softmax_1, impl="torch" (PyTorch reference, materialised)
  outeff_torch_clipped  the same with a clip (gamma=-0.025, zeta=1.0); what impl="auto" ran for a
                        clipped variant on CPU before outeff_cpu_clipped
  outeff_rowwise        Softmax_1, impl="rowwise" (matmuls + the fused Triton row softmax)   CUDA only
  outeff_flash          Softmax_1, impl="triton" (the flash kernel)                          CUDA only
  outeff_flash_clipped  the flash kernel with the clip (two passes over K)                   CUDA only
  outeff_flash_gated    Softmax_1 flash with a per-head output gate g [b, s, h] (gate gradient too)  CUDA only
The Triton methods are skipped off CUDA (under the Triton interpreter their times mean nothing),
unless --interpret asks for them: a rehearsal of the GPU run on CPU (tools/gpu/run.sh --rehearse). A
method whose import fails is reported as "unavailable: <reason>".

Timing: `warmup` untimed calls, then the median of `repeats` timed calls (the minimum is kept in the
JSON too); torch.cuda.Event on CUDA, time.perf_counter on CPU. forward+backward = forward then
out.backward(grad) w.r.t. q, k, v. On CPU the methods of one shape are timed round-robin (one call
of each per round), so that the load of a shared machine falls on all of them alike; on CUDA one
method after the other (--interleave / --no-interleave override).

Peak memory:
  CUDA: torch.cuda.max_memory_allocated() during one forward+backward, minus what was allocated
        before it (inputs included in neither), in MiB.
  CPU:  approximate. The peak resident set size (the kernel's VmHWM, what resource's ru_maxrss
        reports, read from /proc/self/status and reset through /proc/self/clear_refs) of a fresh
        subprocess that runs one forward+backward (after a warm-up call on a tiny shape, so that
        library and thread-pool initialisation is not counted), minus that subprocess's resident
        set size just before the call (inputs excluded). It counts
        the allocator's and the OS's page granularity and anything torch caches, so read it as an
        order of magnitude (materialised O(sq^2) vs O(sq)), not as an exact figure.

Targets on CPU (issue 14; fp32, d 64, causal; checked when run on CPU):
  C1  outeff_cpu and outeff_cpu_learnable forward+backward <= 1.3x SDPA vanilla (sq 512-4096).
  C2  outeff_cpu >= 3x faster (forward+backward) than megatron-core's off-by-one path at sq 2048.
  C3  outeff_cpu / outeff_cpu_learnable peak memory <= 2x SDPA vanilla's (every shape).
  C4  clipped: outeff_cpu_clipped forward+backward no slower than outeff_torch_clipped (every shape).
Targets on CUDA (meant for an H100/H200 in bf16; checked whenever the flash results exist, so a CPU
rehearsal exercises the checks, but only CUDA values mean anything):
  T1  Softmax_1 flash forward+backward <= 1.10x SDPA vanilla (every shape with 2k <= sq <= 16k).
  T2  Softmax_1 flash >= 3x faster (forward+backward) than megatron-core's off-by-one path at
      sq=4096, with memory linear in sq (peak memory grows <= 2.5x per doubling of sq).
  T3  clipped Softmax_1 (two-pass flash) forward+backward <= 2.0x SDPA vanilla (2k <= sq <= 16k).
  T4  gated Softmax_1 flash forward+backward <= 1.10x SDPA vanilla (2k <= sq <= 16k).

Usage:
  python tools/bench_attention.py                          # defaults for the device found
  python tools/bench_attention.py --sq 1024 4096 --d 128 --dtype bf16 --repeats 20 --output-json r.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from megatron_outeff.utils.cli import OneLineArgumentParser, command, nonnegative_int, output_file, positive_int

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLIP = (-0.025, 1.0)
METHODS = [
    "sdpa_vanilla", "mcore_offbyone", "outeff_cpu", "outeff_cpu_learnable", "outeff_cpu_clipped", "outeff_torch",
    "outeff_torch_clipped", "outeff_rowwise", "outeff_flash", "outeff_flash_clipped", "outeff_flash_gated",
]
TRITON_METHODS = {"outeff_rowwise", "outeff_flash", "outeff_flash_clipped", "outeff_flash_gated"}
CPU_METHODS = {"outeff_cpu", "outeff_cpu_learnable", "outeff_cpu_clipped"}
TARGET_SQ = (2048, 16384)  # T1, T3, T4 hold over this range of sq (the project's performance targets)
# bytes per score-matrix element a materialised method keeps alive in forward+backward (estimate,
# used to skip shapes that would not fit)
MATERIALISED_BYTES = {"mcore_offbyone": 24, "outeff_torch": 24, "outeff_torch_clipped": 28, "outeff_cpu_clipped": 12,
                      "outeff_rowwise": 10}


class Unavailable(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# the methods: each returns a closure out = f() over fixed inputs q, k, v [b, s, h, d]
# ------------------------------------------------------------------------------------------------
def build_method(name: str, q, k, v) -> Callable[[], torch.Tensor]:
    b, s, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    if name == "sdpa_vanilla":
        # SDPA wants [b, h, s, d]; the transposed views are what a [b, s, h, d] model would pass
        def f():
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            return o.transpose(1, 2)
        return f
    if name == "mcore_offbyone":
        try:
            from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
            from megatron.core.transformer.enums import AttnMaskType
            from megatron.core.transformer.utils import attention_mask_func
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"{type(e).__name__}: {e}") from None
        fsm = FusedScaleMaskSoftmax(
            input_in_fp16=q.dtype == torch.float16, input_in_bf16=q.dtype == torch.bfloat16,
            attn_mask_type=AttnMaskType.causal, scaled_masked_softmax_fusion=False,
            mask_func=attention_mask_func, softmax_in_fp32=True, scale=scale,
        )
        # explicit mask: its default causal mask is built on "cuda"
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1).view(1, 1, s, s)
        offset = torch.zeros(h, device=q.device)

        def f():
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            scores = qt @ kt.transpose(-1, -2)
            p = fsm(scores, mask, softmax_offset=offset)
            return (p.to(vt.dtype) @ vt).transpose(1, 2)
        return f
    try:
        from megatron_outeff.ops import outeff_attention
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"{type(e).__name__}: {e}") from None
    impl = {"outeff_cpu": "auto", "outeff_cpu_learnable": "auto", "outeff_cpu_clipped": "auto", "outeff_torch": "torch",
            "outeff_torch_clipped": "torch", "outeff_rowwise": "rowwise",
            "outeff_flash": "triton", "outeff_flash_clipped": "triton", "outeff_flash_gated": "triton"}[name]
    clip = CLIP if name.endswith("clipped") else None
    gate = None
    if name.endswith("gated"):  # a per-head gate in (0, 1), trained with the rest: its gradient counts
        g = torch.Generator(device="cpu").manual_seed(1)
        gate = torch.rand(b, s, h, generator=g).to(device=q.device, dtype=q.dtype).requires_grad_(q.requires_grad)
    if name == "outeff_cpu_learnable":
        offset = torch.zeros(h, device=q.device, requires_grad=True)

        def f():
            return outeff_attention(q, k, v, softmax="learnable", offset=offset, causal=True, impl=impl)
        return f

    def f():
        return outeff_attention(q, k, v, softmax="softmax1", clip=clip, gate=gate, causal=True, impl=impl)

    if impl in ("triton", "rowwise"):
        try:  # the flash kernel may not exist on this branch yet: probe once with a tiny input
            t = torch.randn(1, 16, 1, d, device=q.device, dtype=q.dtype)
            outeff_attention(t, t, t, softmax="softmax1", clip=clip, causal=True, impl=impl)
        except ImportError as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from None
    return f


# ------------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------------
def make_inputs(b, s, h, d, dtype, device, requires_grad=True, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = [torch.randn(b, s, h, d, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    for t in qkv:
        t.requires_grad_(requires_grad)
    return qkv


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, warmup, repeats) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """The kernel's peak-RSS counter of this process (VmHWM), in MiB.

    Not resource.getrusage().ru_maxrss: Linux carries that value over fork + exec from the parent,
    so a child of a big benchmark process would report the parent's size.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss():
    try:  # Linux >= 4.0: "5" resets the peak RSS counter to the current RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def fwd_bwd_closure(f, q, k, v, grad):
    def run():
        for t in (q, k, v):
            t.grad = None
        f().backward(grad)
    return run


def measure_memory_cuda(run) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def memprobe_main(args):
    """Child process (CPU): one forward+backward of one method, print peak RSS growth in MiB."""
    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device("cpu")
    b, s, h, d = args.b, args.sq[0], args.h, args.d[0]
    # warm up on a tiny shape first: library / thread-pool initialisation must not count
    tq, tk, tv = make_inputs(1, 16, h, d, DTYPES[args.dtype[0]], device)
    fwd_bwd_closure(build_method(args.memprobe, tq, tk, tv), tq, tk, tv, torch.randn_like(tq))()
    del tq, tk, tv
    q, k, v = make_inputs(b, s, h, d, DTYPES[args.dtype[0]], device)
    f = build_method(args.memprobe, q, k, v)
    grad = torch.randn(b, s, h, d, dtype=q.dtype)
    run = fwd_bwd_closure(f, q, k, v, grad)
    _reset_peak_rss()
    before = _rss_mib()
    run()
    print(json.dumps({"peak_mib": max(_peak_rss_mib() - before, 0.0)}))


def measure_memory_cpu(method, b, s, h, d, dtype_name, threads) -> Optional[float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--memprobe", method, "--b", str(b), "--h", str(h),
           "--sq", str(s), "--d", str(d), "--dtype", dtype_name]
    if threads:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    for line in reversed(r.stdout.strip().splitlines()):
        try:
            return json.loads(line)["peak_mib"]
        except (ValueError, KeyError):
            continue
    return None


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def _loadavg():
    """1/5/15-minute load averages: CPU timings of a shared machine are only as good as this."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def default_config(cuda: bool) -> Dict:
    if cuda:
        return dict(sq=[512, 1024, 2048, 4096, 8192, 16384], d=[64, 128], dtype=["fp16", "bf16"],
                    b=None, h=None, tokens=16384, hidden=2048, warmup=5, repeats=20)
    return dict(sq=[512, 1024, 2048, 4096], d=[64], dtype=["fp32"], b=1, h=8, tokens=None, hidden=None,
                warmup=2, repeats=7)


def shape_for(sq, d, cfg):
    b = cfg["b"] if cfg["b"] else max(1, cfg["tokens"] // sq)   # keep b * sq (tokens) fixed
    h = cfg["h"] if cfg["h"] else max(1, cfg["hidden"] // d)    # keep h * d (hidden) fixed
    return b, h


def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "megatron.core"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod.replace(".", "_")] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[mod.replace(".", "_")] = f"unavailable: {type(e).__name__}"
    return out


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


def _check(target: str, value: float, goal: float, op: str, **where) -> Dict:
    """One target check: met when value <= goal (op "<=") or value >= goal (op ">=")."""
    met = value <= goal if op == "<=" else value >= goal
    return dict(target=target, **where, value=value, goal=goal, op=op, met=bool(met))


def check_targets(results: List[Dict]) -> List[Dict]:
    """T1-T4 (see the module docstring), one check per shape (the memory check: per dtype and d)."""
    checks = []
    by = {}
    for r in results:
        by.setdefault((r["dtype"], r["d"]), {}).setdefault(r["sq"], {})[r["method"]] = r

    def ok(r):
        return r is not None and r.get("status") == "ok"

    for (dt, d), per_sq in sorted(by.items()):
        for sq, m in sorted(per_sq.items()):
            where = dict(dtype=dt, d=d, sq=sq)
            fl, fc, fg = m.get("outeff_flash"), m.get("outeff_flash_clipped"), m.get("outeff_flash_gated")
            if TARGET_SQ[0] <= sq <= TARGET_SQ[1]:
                if ok(fl):
                    checks.append(_check("T1 flash softmax1 fwd+bwd <= 1.10x SDPA", fl["ratio_fwdbwd"], 1.10, "<=", **where))
                if ok(fc):
                    checks.append(_check("T3 clipped flash fwd+bwd <= 2.0x SDPA", fc["ratio_fwdbwd"], 2.0, "<=", **where))
                if ok(fg):
                    checks.append(_check("T4 gated flash softmax1 fwd+bwd <= 1.10x SDPA", fg["ratio_fwdbwd"], 1.10, "<=",
                                         **where))
            mc = m.get("mcore_offbyone")
            if sq == 4096 and ok(fl) and ok(mc):
                checks.append(_check("T2 flash >= 3x faster than mcore off-by-one at sq=4096",
                                     mc["fwdbwd_ms"] / fl["fwdbwd_ms"], 3.0, ">=", **where))
        # memory linear in sq: peak per token roughly flat (<= 2.5x growth per doubling)
        sqs = sorted(s for s in per_sq if ok(per_sq[s].get("outeff_flash")) and per_sq[s]["outeff_flash"].get("peak_mib"))
        if len(sqs) >= 2:
            worst = 0.0
            for s0, s1 in zip(sqs, sqs[1:]):
                m0, m1 = per_sq[s0]["outeff_flash"]["peak_mib"], per_sq[s1]["outeff_flash"]["peak_mib"]
                b0, b1 = per_sq[s0]["outeff_flash"]["b"], per_sq[s1]["outeff_flash"]["b"]
                # per sequence (the default keeps b * sq fixed): linear in sq -> 2x per doubling
                growth = (m1 / b1) / max(m0 / b0, 1e-9)          # peak memory per sequence
                worst = max(worst, growth ** (1.0 / math.log2(s1 / s0)))  # per doubling of sq
            checks.append(_check("T2 flash memory linear in sq (growth per doubling <= 2.5x)", worst, 2.5, "<=",
                                 dtype=dt, d=d, sq=None))
    return checks


def print_checks(title: str, checks: List[Dict], if_none: str) -> None:
    print(f"\n{title}:")
    if not checks:
        print(f"  {if_none}")
    for c in checks:
        print(f"  {'MET    ' if c['met'] else 'NOT MET'} {c['target']}  [{c['dtype']} d={c['d']} sq={c['sq']}] "
              f"value {c['value']:.2f}")


def check_cpu_targets(results: List[Dict]) -> List[Dict]:
    """C1-C3 (see the module docstring) from the CPU results."""
    checks = []
    by = {}
    for r in results:
        by.setdefault((r["dtype"], r["d"], r["sq"]), {})[r["method"]] = r

    def ok(r):
        return r is not None and r.get("status") == "ok"

    for (dt, d, sq), m in sorted(by.items()):
        base = m.get("sdpa_vanilla")
        for name in ("outeff_cpu", "outeff_cpu_learnable"):
            r = m.get(name)
            if not (ok(r) and ok(base)):
                continue
            if 512 <= sq <= 4096:
                checks.append(dict(target=f"C1 {name} fwd+bwd <= 1.3x SDPA", dtype=dt, d=d, sq=sq,
                                   value=r["ratio_fwdbwd"], met=r["ratio_fwdbwd"] <= 1.3))
            if r.get("peak_mib") is not None and base.get("peak_mib"):
                mem = r["peak_mib"] / base["peak_mib"]
                checks.append(dict(target=f"C3 {name} peak memory <= 2x SDPA's", dtype=dt, d=d, sq=sq,
                                   value=mem, met=mem <= 2.0))
        new, old = m.get("outeff_cpu_clipped"), m.get("outeff_torch_clipped")
        if ok(new) and ok(old):
            ratio = new["fwdbwd_ms"] / old["fwdbwd_ms"]
            checks.append(dict(target="C4 outeff_cpu_clipped fwd+bwd <= outeff_torch_clipped's", dtype=dt, d=d,
                               sq=sq, value=ratio, met=ratio <= 1.0))
        mc, oc = m.get("mcore_offbyone"), m.get("outeff_cpu")
        if sq == 2048 and ok(mc) and ok(oc):
            speedup = mc["fwdbwd_ms"] / oc["fwdbwd_ms"]
            checks.append(dict(target="C2 outeff_cpu >= 3x faster than mcore off-by-one at sq=2048", dtype=dt,
                               d=d, sq=sq, value=speedup, met=speedup >= 3.0))
    return checks


def format_table(results: List[Dict]) -> str:
    head = "| dtype | b | h | sq | d | method | fwd ms | fwd+bwd ms | peak MiB | fwd x SDPA | fwd+bwd x SDPA | status |"
    lines = [head, "|" + "---|" * 12]

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in results:
        lines.append(
            f"| {r['dtype']} | {r['b']} | {r['h']} | {r['sq']} | {r['d']} | {r['method']} | "
            f"{num(r.get('fwd_ms'), '.2f')} | {num(r.get('fwdbwd_ms'), '.2f')} | {num(r.get('peak_mib'), '.0f')} | "
            f"{num(r.get('ratio_fwd'), '.2f')} | {num(r.get('ratio_fwdbwd'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


@command
def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sq", type=positive_int, nargs="+", help="sequence lengths (sq = sk, causal)")
    p.add_argument("--d", type=positive_int, nargs="+", help="head dims")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="dtypes")
    p.add_argument("--b", type=positive_int, help="batch (default CUDA: tokens // sq; CPU: 1)")
    p.add_argument("--h", type=positive_int, help="heads (default CUDA: hidden // d; CPU: 8)")
    p.add_argument("--tokens", type=positive_int, help="CUDA default b = tokens // sq (16384)")
    p.add_argument("--hidden", type=positive_int, help="CUDA default h = hidden // d (2048)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--warmup", type=nonnegative_int)
    p.add_argument("--repeats", type=positive_int)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the methods round-robin, one call each per round (default: on CPU only)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    p.add_argument("--output-json", type=output_file, default=None, help="JSON output path (default tools/results/bench_attention_<device>.json)")
    p.add_argument("--output-md", type=output_file, default=None, help="also write the Markdown table here")
    p.add_argument("--interpret", action="store_true",
                   help="CPU only: run the Triton methods under the Triton interpreter (a rehearsal: times mean nothing)")
    p.add_argument("--memprobe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.interpret:  # before megatron_outeff.ops is imported (kernels are decorated at import)
        os.environ["TRITON_INTERPRET"] = "1"
    if args.memprobe:
        return memprobe_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = default_config(cuda)
    for key in ("sq", "d", "dtype", "b", "h", "tokens", "hidden", "warmup", "repeats"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if not cuda and (cfg["b"] is None or cfg["h"] is None):
        cfg["b"], cfg["h"] = cfg["b"] or 1, cfg["h"] or 8
    total_mem = (torch.cuda.get_device_properties(device).total_memory if cuda
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    interleave = (not cuda) if args.interleave is None else args.interleave

    meta = dict(device=device_name(device), device_type=device.type, versions=versions(),
                command=" ".join([sys.executable, os.path.relpath(os.path.abspath(__file__), os.getcwd())] + sys.argv[1:]),
                config={k: v for k, v in cfg.items()}, methods=args.methods, clip=CLIP,
                timer="torch.cuda.Event" if cuda else "time.perf_counter", interleaved=interleave,
                triton_interpreter=bool(args.interpret),
                memory=("torch.cuda.max_memory_allocated minus allocated before (MiB)" if cuda else
                        "approximate: peak RSS (VmHWM) of a subprocess running one fwd+bwd minus its RSS before (MiB)"),
                started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                loadavg_start=_loadavg())
    print(f"device: {meta['device']}\nversions: {meta['versions']}")
    out = args.output_json or os.path.join(ROOT, "tools", "results", f"bench_attention_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results = []
    for dt_name in cfg["dtype"]:
        dtype = DTYPES[dt_name]
        for d in cfg["d"]:
            for sq in cfg["sq"]:
                b, h = shape_for(sq, d, cfg)
                q, k, v = make_inputs(b, sq, h, d, dtype, device)
                grad = torch.randn(b, sq, h, d, dtype=dtype, device=device)
                rows, runs = {}, {}
                for method in args.methods:
                    row = rows[method] = dict(dtype=dt_name, b=b, h=h, sq=sq, d=d, method=method)
                    results.append(row)
                    if method in TRITON_METHODS and not cuda and not args.interpret:
                        row["status"] = "skipped: CUDA only (interpreter timings are meaningless)"
                        continue
                    if method in CPU_METHODS and cuda:
                        row["status"] = "skipped: CPU only (impl='auto' runs the flash kernel on CUDA: outeff_flash)"
                        continue
                    need = MATERIALISED_BYTES.get(method, 0) * b * h * sq * sq
                    if need > 0.6 * total_mem:
                        row["status"] = f"skipped: needs ~{need / 2**30:.0f} GiB (score matrix materialised)"
                        continue
                    try:
                        f = build_method(method, q, k, v)
                        runs[method] = (f, fwd_bwd_closure(f, q, k, v, grad))
                    except Unavailable as e:
                        row["status"] = f"unavailable: {e}"
                    except Exception as e:  # noqa: BLE001  (report, keep benchmarking)
                        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                # time: round-robin over the methods (CPU: every method sees the same machine load),
                # or one method after the other (CUDA)
                times = {m: {"fwd": [], "fwdbwd": []} for m in runs}
                failed = {}
                schedule = ([list(runs)] * (cfg["warmup"] + cfg["repeats"]) if interleave
                            else [[m] for m in runs for _ in range(cfg["warmup"] + cfg["repeats"])])
                seen = {m: 0 for m in runs}
                for group in schedule:
                    for method in group:
                        if method in failed:
                            continue
                        warm = seen[method] < cfg["warmup"]
                        seen[method] += 1
                        f, run = runs[method]
                        try:
                            with torch.no_grad():
                                t_f = time_call(f, device, 0, 1)
                            t_fb = time_call(run, device, 0, 1)
                        except torch.cuda.OutOfMemoryError:
                            failed[method] = "OOM"
                            continue
                        except Exception as e:  # noqa: BLE001
                            failed[method] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                            continue
                        if not warm:
                            times[method]["fwd"].append(t_f)
                            times[method]["fwdbwd"].append(t_fb)
                for method in runs:
                    row = rows[method]
                    if method in failed:
                        row["status"] = failed[method]
                        continue
                    row["fwd_ms"] = statistics.median(times[method]["fwd"])
                    row["fwdbwd_ms"] = statistics.median(times[method]["fwdbwd"])
                    row["fwd_min_ms"] = min(times[method]["fwd"])
                    row["fwdbwd_min_ms"] = min(times[method]["fwdbwd"])
                    row["status"] = "ok"
                    if not args.no_memory:
                        try:
                            row["peak_mib"] = (measure_memory_cuda(runs[method][1]) if cuda else
                                               measure_memory_cpu(method, b, sq, h, d, dt_name, args.threads))
                        except torch.cuda.OutOfMemoryError:
                            row["peak_mib"] = None
                    if cuda:
                        torch.cuda.empty_cache()
                base = rows.get("sdpa_vanilla")
                for method, row in rows.items():
                    if base is not None and base.get("status") == "ok" and row.get("status") == "ok":
                        row["ratio_fwd"] = row["fwd_ms"] / base["fwd_ms"]
                        row["ratio_fwdbwd"] = row["fwdbwd_ms"] / base["fwdbwd_ms"]
                    print(f"  {dt_name} b={b} h={h} sq={sq} d={d} {method:22s} "
                          f"fwd {row.get('fwd_ms', float('nan')):9.2f} ms  fwd+bwd {row.get('fwdbwd_ms', float('nan')):9.2f} ms  "
                          f"peak {row.get('peak_mib') if row.get('peak_mib') is None else round(row['peak_mib'])} MiB  "
                          f"x SDPA {row.get('ratio_fwdbwd', float('nan')):.2f}  {row['status']}", flush=True)
                del runs
                del q, k, v, grad
                # after every shape: a run stopped by a time limit still leaves what it measured
                with open(out, "w") as fh:
                    json.dump(dict(meta=dict(meta, partial=True), results=results, targets=check_targets(results)),
                              fh, indent=1)

    table = format_table(results)
    print("\n" + table)
    checks = check_targets(results)  # T1-T4 (flash results: CUDA, or a CPU rehearsal under --interpret)
    if cuda or checks:
        print_checks("project targets (H100/H200)" + ("" if cuda else " - CPU rehearsal, values meaningless"),
                     checks, "none could be checked (flash kernel unavailable?)")
    if not cuda:
        cpu_checks = check_cpu_targets(results)  # C1-C4
        print_checks("project targets (CPU, issue 14)", cpu_checks, "none could be checked")
        checks = checks + cpu_checks
    meta["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["loadavg_end"] = _loadavg()
    with open(out, "w") as fh:
        json.dump(dict(meta=meta, results=results, targets=checks), fh, indent=1)
    print(f"\nwrote {out}")
    if args.output_md:
        with open(args.output_md, "w") as fh:
            fh.write(f"# Attention benchmark ({meta['device']})\n\n")
            fh.write(f"Command: `{meta['command']}`\n\n")
            fh.write(f"Versions: {meta['versions']}\n\nTimer: {meta['timer']}, median of {cfg['repeats']} "
                     f"after {cfg['warmup']} warmup{', methods timed round-robin' if interleave else ''}. Peak memory: {meta['memory']}.\n\n"
                     f"Load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']} "
                     f"on {os.cpu_count()} logical cores: on a shared CPU the times are noisy.\n\n")
            fh.write(table + "\n")
            if checks:
                fh.write("\nProject targets:\n\n")
                for c in checks:
                    fh.write(f"- {'MET' if c['met'] else 'NOT MET'}: {c['target']} [{c['dtype']} d={c['d']} sq={c['sq']}] "
                             f"value {c['value']:.2f}\n")
        print(f"wrote {args.output_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
