#!/usr/bin/env python
"""The GPU check's first step: device, driver, versions, and whether everything the checks import resolves.

Prints a short report and writes it as JSON (tools/gpu/summarize.py puts it into summary.json):
  device          torch.cuda.get_device_name(0), or "CPU: <model>" without CUDA
  capability      "9.0" style compute capability (CUDA only)
  driver          nvidia-smi's driver version, or null
  cuda            torch.version.cuda
  versions        python, torch, triton, transformers, megatron-core, deepspeed, compressed-tensors,
                  pydantic (the installed distribution's version, "missing" if not installed)
  imports         module -> "ok" | "<ExceptionType>: <message>" for every module the checks import
  requirements    for each distribution of the offline bundle: its Requires-Dist entries (no extras,
                  markers evaluated) that the installed packages do not satisfy ([] = all satisfied)
  sdpa_backend    {shape: backend}: torch._fused_sdp_choice (what F.scaled_dot_product_attention, and so
                  our sink attention, runs) for bf16 causal self-attention, 16 heads, sq 4096, d 64 / 128
                  (CUDA only)
  ok              true when every import resolved and every requirement is satisfied

    python tools/gpu/env_report.py --output-json env.json [--bundle .gpu-bundle]
Exit code 0 even when something is missing (the report says what); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

DISTRIBUTIONS = (
    "torch",
    "triton",
    "transformers",
    "megatron-core",
    "deepspeed",
    "compressed-tensors",
    "pydantic",
    "numpy",
    "safetensors",
    "sentencepiece",
    "tensorboard",
)
# every module the GPU checks import, directly or through megatron_outeff
MODULES = (
    "torch",
    "triton",
    "transformers",
    "megatron.core",
    "megatron.core.transformer.transformer_layer",
    "deepspeed",
    "compressed_tensors",
    "sentencepiece",
    "tensorboard",
    "safetensors",
    "yaml",
    "megatron_outeff.ops",
    "megatron_outeff.megatron.layer_spec",
    "megatron_outeff.training.engine",
    "megatron_outeff.quant",
    "megatron_outeff.hf",
)


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _unmet_requirements(bundle: Path) -> dict:
    """Requires-Dist of each bundled distribution that the installed versions do not satisfy."""
    from packaging.requirements import Requirement

    unmet = {}
    for wheel in sorted(bundle.glob("*.whl")):
        dist = wheel.name.split("-")[0]
        try:
            reqs = md.requires(dist) or []
        except md.PackageNotFoundError:
            unmet[dist] = ["not installed"]
            continue
        bad = []
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = _version(req.name)
            if have == "missing" or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                bad.append(f"{req} (installed: {have})")
        unmet[dist] = bad
    return unmet


def _sdpa_backend() -> dict | None:
    """SDPA's backend choice for the headline shapes (bf16, causal, with gradients), CUDA only."""
    import torch

    if not torch.cuda.is_available():
        return None
    names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
    out = {}
    for d in (128, 64):
        q = torch.empty(1, 16, 4096, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        try:
            out[f"bf16 causal sq=4096 d={d}"] = names.get(int(torch._fused_sdp_choice(q, q, q, None, 0.0, True)), "?")
        except RuntimeError as e:
            out[f"bf16 causal sq=4096 d={d}"] = f"error: {str(e).splitlines()[0][:100]}"
    return out


def collect(bundle: Path | None) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.cuda.get_device_name(0)
        cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    else:
        device, cap = f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)", None
    imports = {}
    for mod in MODULES:
        try:
            importlib.import_module(mod)
            imports[mod] = "ok"
        except Exception as e:  # noqa: BLE001  (the report names what failed)
            imports[mod] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    report = {
        "device": device,
        "capability": cap,
        "driver": _driver(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "executable": sys.executable,
        "versions": {d: _version(d) for d in DISTRIBUTIONS},
        "imports": imports,
        "requirements": _unmet_requirements(bundle) if bundle and bundle.is_dir() else {},
        "sdpa_backend": _sdpa_backend(),
    }
    report["ok"] = all(v == "ok" for v in imports.values()) and not any(report["requirements"].values())
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-json", required=True, help="JSON report path")
    p.add_argument("--bundle", default=None, help="the offline bundle folder whose requirements to check")
    args = p.parse_args(argv)
    if not Path(args.output_json).parent.is_dir():
        print(f"env_report.py: --output-json {args.output_json}: its folder does not exist", file=sys.stderr)
        return 2
    report = collect(Path(args.bundle) if args.bundle else None)
    print(
        f"device: {report['device']} (capability {report['capability']}), driver {report['driver']}, "
        f"CUDA {report['cuda']}, python {report['python']}, SDPA backend {report['sdpa_backend']}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    for mod, status in report["imports"].items():
        if status != "ok":
            print(f"IMPORT FAILED {mod}: {status}")
    for dist, bad in report["requirements"].items():
        for b in bad:
            print(f"UNMET {dist} requires {b}")
    print(
        f"environment {'OK' if report['ok'] else 'INCOMPLETE'}: {sum(v == 'ok' for v in report['imports'].values())}"
        f"/{len(report['imports'])} imports resolve"
    )
    Path(args.output_json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
