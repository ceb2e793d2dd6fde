"""Ahead-of-time compilation of our Triton kernels for a GPU architecture, on a machine without a GPU,
and the compile-level facts of what was compiled.

A launch (``flash_attention.KernelLaunch``) is compiled exactly as Triton's runtime would compile it
when the launcher passes those arguments: the kernel's own argument binder specialises them (pointers
and integers divisible by 16 get ``tt.divisibility = 16``, which enables vectorised and pipelined
loads; constexprs; the int32 / int64 choice of each integer), for ``GPUTarget("cuda", arch, 32)``.
Pass tensors shaped, strided and allocated as at run time (torch's CPU allocations are 64-byte
aligned, CUDA's 256-byte; views keep their offsets).

Facts per compiled kernel (``KernelFacts``): dynamic shared memory (Triton's metadata), registers per
thread and stack frame (``cuobjdump -res-usage``), and from the SASS (``cuobjdump -sass``): spill
stores / loads (STL / LDL: our kernels have no local arrays, so every one is a spill), Hopper
warpgroup matrix instructions (HGMMA = PTX wgmma), warp-level ones (HMMA = PTX mma.sync), the
instruction count and a hash of the whole SASS listing (``sass_sha256``: two compiles of one launch with
the same hash are the same machine code, which is how a refactoring of a kernel shows it changed nothing).
cuobjdump is the one shipped with Triton's NVIDIA backend.

Used by the ahead-of-time tests (``tests/ops/test_flash_attention.py``) and
``tools/triton_compile_report.py``.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List

# per-block shared memory limits with the opt-in attribute Triton sets (CUDA programming guide,
# compute capabilities table): sm_80 163 KiB, sm_86/89 99 KiB, sm_90 227 KiB. The flash kernels use
# one table for sm_80-89, so their sm_80 compiles are held to FAMILY_SHARED_MEMORY_LIMIT[80] = 99 KiB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
FAMILY_SHARED_MEMORY_LIMIT = {80: 99 * 1024, 90: 227 * 1024}


@dataclass
class KernelFacts:
    kernel: str
    arch: int
    config: str  # "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3"
    specialisation: str  # the constexpr flags that differ from False / the dtype, e.g. "bf16 d128 CAUSAL HAS_SINK"
    shared_bytes: int
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    wgmma: int
    mma: int
    instructions: int
    compile_s: float
    unaligned: str = ""  # pointer arguments the runtime would NOT mark 16-byte aligned (comma-separated)
    sass_sha256: str = ""  # the first 16 hex digits of sha256 of the cuobjdump -sass listing

    @property
    def key(self) -> tuple:
        """What identifies one compiled kernel across two reports: (kernel, arch, config, specialisation)."""
        return (self.kernel, self.arch, self.config, self.specialisation)

    def as_dict(self) -> dict:
        return asdict(self)


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: Triton's NVIDIA backend ships no {name}")
    return path


_SASS_OP = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", re.M)
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)")


def cubin_facts(cubin: bytes) -> Dict[str, int]:
    """registers, stack_bytes, spill_stores, spill_loads, wgmma, mma, instructions, sass_sha256 of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = _RES.search(res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage: no REG/STACK line in {res[:200]!r}")
    ops = [op.split(".")[0] for op in _SASS_OP.findall(sass)]
    return dict(
        registers=int(m.group(1)),
        stack_bytes=int(m.group(2)),
        spill_stores=ops.count("STL"),
        spill_loads=ops.count("LDL"),
        wgmma=ops.count("HGMMA"),
        mma=ops.count("HMMA"),
        instructions=len(ops),
        sass_sha256=hashlib.sha256(sass.encode()).hexdigest()[:16],
    )


def _short(dtype: str) -> str:
    return dtype.replace("torch.", "").replace("bfloat", "bf").replace("float", "fp")


def _describe(meta: dict, dtype: str) -> str:
    parts = [dtype] + ([f"d{meta['BLOCK_D']}"] if "BLOCK_D" in meta else [])
    for k, v in meta.items():
        if k in ("BLOCK_D", "DOT_T", "PREC"):
            continue
        if v is True:
            parts.append(k)
        elif v not in (False, None):
            parts.append(f"{k}={v}")
    return " ".join(parts)


def compile_launch(launch, arch: int, dtype: str = "") -> List[KernelFacts]:
    """Compiles ``launch`` (a ``flash_attention.KernelLaunch``) for sm_``arch`` with each of its
    candidate configs, specialised on its arguments as the runtime would; one ``KernelFacts`` each.
    dtype: the label of the call's input dtype (default: the first argument's).
    Errors: whatever Triton raises when a kernel does not compile (out of shared memory, ptxas)."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    dtype = _short(dtype or str(launch.args[0].dtype))
    facts = []
    for cfg in launch.configs:
        kwargs = dict(launch.meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        unaligned = [
            name
            for i, name in enumerate(fn.arg_names)
            if str(signature.get(name, "")).startswith("*") and ["tt.divisibility", 16] not in attrs.get((i,), [])
        ]
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        elapsed = time.perf_counter() - t0
        config = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" warps={cfg.num_warps} stages={cfg.num_stages}"
        facts.append(
            KernelFacts(
                kernel=fn.__name__,
                arch=arch,
                config=config,
                specialisation=_describe(launch.meta, dtype),
                shared_bytes=int(compiled.metadata.shared),
                compile_s=round(elapsed, 2),
                unaligned=",".join(unaligned),
                **cubin_facts(compiled.asm["cubin"]),
            )
        )
    return facts


# ------------------------------------------------------------------------------------------------
# Every launch of the flash kernels (flash_attention.py) for one architecture
# ------------------------------------------------------------------------------------------------

# (dtype, head dim, flag set): BLOCK_D 64 and 128 with every flag on and off in fp16 / bf16 (spills
# are checked there), fp32 (TF32) with every flag on (shared memory), and OPT-2.7b's 80 (BLOCK_D 128
# with masked columns) with every flag on
FLASH_CASES = (
    tuple((dt, d, f) for dt in ("float16", "bfloat16") for d in (64, 128) for f in ("all", "none"))
    + tuple((dt, d, "all") for dt in ("float16", "bfloat16", "float32") for d in (80,))
    + tuple(("float32", d, "all") for d in (64, 128))
)


def _flash_item_launches(arch: int, dtype_name: str, head_dim: int, flags: str, mode: str):
    """The launches of one forward + backward call, with tensors shaped as at run time: q [2, 1024, 4, d],
    k / v [2, 1024, 2, d] (GQA), contiguous, CPU-allocated (64-byte aligned, as CUDA's are 256-byte).
    flags "all": causal, clipped, learnable sink, a gate that needs a gradient, key padding, GQA 4 -> 2;
    "none": no flag at all, MHA."""
    import torch

    from . import flash_attention as fa

    dtype = getattr(torch, dtype_name)
    b, s, h, h_kv = 2, 1024, 4, 2
    on = flags == "all"
    if not on:
        h_kv = h  # MHA: GROUP = 1, which Triton's runtime specialises as a constant
    q = torch.empty(b, s, h, head_dim, dtype=dtype)
    k = torch.empty(b, s, h_kv, head_dim, dtype=dtype)
    v = torch.empty_like(k)
    gate = torch.empty(b, s, h, dtype=dtype) if on else None
    kpm = torch.empty(b, s, dtype=torch.int8) if on else None
    sink = torch.empty(h) if on else None
    launches, out, out_u, lse = fa.forward_launches(q, k, v, sink, gate, kpm, 0.125, 1.03, -0.03, on, on, on, arch)
    saved = os.environ.get("OUTEFF_FLASH_DQ")
    os.environ["OUTEFF_FLASH_DQ"] = mode
    try:
        bwd = fa.backward_launches(
            q,
            k,
            v,
            torch.empty_like(out),
            gate,
            kpm,
            out_u,
            lse,
            0.125,
            1.03,
            -0.03,
            on,
            on,
            on,
            True,
            True,
            False,
            arch,
        )[0]
    finally:
        if saved is None:
            os.environ.pop("OUTEFF_FLASH_DQ")
        else:
            os.environ["OUTEFF_FLASH_DQ"] = saved
    return launches + bwd


def flash_items(arch: int, cases=FLASH_CASES, dq_modes=("pass",)):
    """The work list of ``compile_flash``: (dtype, head dim, flags, dQ mode, launch index) for every
    distinct kernel specialisation x candidate config the launcher picks on sm_``arch`` for ``cases``
    (``FLASH_CASES``) with the dQ structures ``dq_modes`` (the launcher's is "pass"; "atomic" is
    OUTEFF_FLASH_DQ=atomic)."""
    seen, items = set(), []
    for dt, d, flags in cases:
        for mode in dq_modes:
            for i, la in enumerate(_flash_item_launches(arch, dt, d, flags, mode)):
                if mode == "atomic" and not la.meta.get("ATOMIC_DQ"):
                    continue  # the other launches are the pass's
                key = (
                    la.kernel.__name__,
                    dt,
                    tuple(sorted((k, str(v)) for k, v in la.meta.items())),
                    tuple(str(c) for c in la.configs),
                )
                if key not in seen:
                    seen.add(key)
                    items.append((dt, d, flags, mode, i))
    return items


def _compile_item(arch: int, item) -> List[KernelFacts]:
    dt, d, flags, mode, i = item
    la = _flash_item_launches(arch, dt, d, flags, mode)[i]
    facts = compile_launch(la, arch, dt)
    for f in facts:
        f.specialisation += f" [{flags}, dQ {mode}, d={d}]"
    return facts


def compile_flash(arch: int, workers: int = 1, progress=None, items=None) -> List[KernelFacts]:
    """Compiles ``items`` (default: ``flash_items(arch)``, what the launcher picks) for sm_``arch`` in
    ``workers`` processes; ``progress(done, total, facts)`` after each item."""
    items = flash_items(arch) if items is None else items
    out: List[KernelFacts] = []
    if workers <= 1:
        for n, item in enumerate(items, 1):
            facts = _compile_item(arch, item)
            out += facts
            if progress:
                progress(n, len(items), facts)
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_item, arch, item) for item in items]
        for n, fut in enumerate(futures, 1):
            facts = fut.result()
            out += facts
            if progress:
                progress(n, len(items), facts)
    return out
