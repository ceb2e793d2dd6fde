"""The one benchmark harness of tools/bench_*.py: timing, memory, round-robin against a baseline in the
same process, the device and load record, JSON / Markdown output written as results come in.

    round_robin(fns, warmup=, repeats=, device=)   {name: Samples}: every function called once per
                                                   round (rotating order), so that the drift of a
                                                   shared machine falls on all alike; a function that
                                                   raises (out of memory included) is dropped with the
                                                   reason, the others go on
    time_ms(fn, device)                            one call in milliseconds (CUDA events on CUDA)
    cuda_peak_mib(fn)                              torch.cuda.max_memory_allocated during fn minus what
                                                   was allocated before, MiB
    rss_mib(), peak_rss_mib(), reset_peak_rss()    this process's resident set (VmRSS, VmHWM) for CPU
                                                   memory probes in a fresh subprocess
                                                   (``probe_subprocess``)
    environment(device)                            device name, versions, threads, CPU capability,
                                                   load average, start time, command line
    Report(json_path, md_path)                     the result file (its options: bench/options.py): ``save()`` after every shape or
                                                   round (atomic rename; ``meta.partial`` until
                                                   ``finish()``), so a run cut by a time limit or
                                                   Ctrl-C keeps what it measured
    markdown_table(rows, columns)                  rows as a Markdown table

Timing reports the median and the minimum of the timed calls; ratios are taken against a baseline
timed in the same rounds (``ratio``). Knows torch only.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_outeff.utils.atomic import write_text_atomic
from megatron_outeff.utils.markdown import md_row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of fn (CUDA events around it on CUDA, perf_counter elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@dataclass
class Samples:
    """The timed calls of one function (milliseconds), the error that stopped it, its CUDA peak."""

    ms: List[float] = field(default_factory=list)
    error: Optional[str] = None
    peak_mib: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.ms)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.ms) if self.ms else None

    @property
    def min(self) -> Optional[float]:
        return min(self.ms) if self.ms else None


def _error_text(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    return f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def round_robin(
    fns: Dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    interleave: bool = True,
    rotate: bool = True,
    track_cuda_peak: bool = False,
    after_round: Optional[Callable[[int, Dict[str, Samples]], None]] = None,
) -> Dict[str, Samples]:
    """{name: Samples} of ``repeats`` timed calls of each function after ``warmup`` untimed ones.

    interleave: one call of each function per round (rotating the order each round when ``rotate``);
    otherwise all calls of one function, then the next (the usual choice on a GPU, where nothing
    else shares the device). track_cuda_peak: the peak CUDA memory over each function's calls.
    after_round(round_index, samples): called after every round (incremental output)."""
    samples = {name: Samples() for name in fns}
    names = list(fns)
    rounds = warmup + repeats
    if interleave:
        schedule = [(r, names[r % len(names) :] + names[: r % len(names)] if rotate else names) for r in range(rounds)]
    else:
        schedule = [(r, [n]) for n in names for r in range(rounds)]
    for r, group in schedule:
        for name in group:
            s = samples[name]
            if s.error is not None:
                continue
            try:
                if track_cuda_peak:
                    sync(device)
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t = time_ms(fns[name], device)
                if track_cuda_peak:
                    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                    s.peak_mib = max(s.peak_mib or 0.0, peak)
            except Exception as e:  # noqa: BLE001  (report it, keep measuring the others)
                s.error = _error_text(e)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if r >= warmup:
                s.ms.append(t)
        if after_round is not None and (interleave or r == rounds - 1):
            after_round(r, samples)
    return samples


def ratio(samples: Dict[str, Samples], name: str, baseline: str, stat: str = "median") -> Optional[float]:
    """samples[name] / samples[baseline] by median (or "min"); None unless both ran."""
    a, b = samples.get(name), samples.get(baseline)
    if a is None or b is None or not (a.ok and b.ok):
        return None
    return getattr(a, stat) / getattr(b, stat)


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
def cuda_peak_mib(fn: Callable[[], object], device: Optional[torch.device] = None) -> float:
    """Peak CUDA memory allocated during fn() minus what was allocated before it, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _status_kib(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> Optional[float]:
    """This process's resident set size (VmRSS), MiB (None off Linux)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> Optional[float]:
    """This process's peak resident set (VmHWM), MiB. Not getrusage's ru_maxrss: Linux carries that
    over fork + exec from the parent, so a child of a big benchmark would report the parent's size."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> None:
    """VmHWM := VmRSS (Linux >= 4.0: writing "5" to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def probe_subprocess(
    cmd: Sequence[str], *, key: str = "peak_mib", env: Optional[dict] = None, timeout: float = 600
) -> Optional[float]:
    """Run a memory probe (a fresh process printing one JSON line {key: value}); the value or None."""
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    for line in reversed(r.stdout.strip().splitlines()):
        try:
            return float(json.loads(line)[key])
        except (ValueError, KeyError, TypeError):
            continue
    return None


# ------------------------------------------------------------------------------------------------
# what ran where
# ------------------------------------------------------------------------------------------------
def loadavg() -> Optional[List[float]]:
    """1/5/15-minute load averages: CPU timings of a shared machine are only as good as this."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_name(device: torch.device) -> str:
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


def versions(modules: Iterable[str] = ("triton", "megatron.core", "deepspeed")) -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in modules:
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod.replace(".", "_")] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            out[mod.replace(".", "_")] = f"unavailable: {type(e).__name__}"
    return out


def environment(device: torch.device, modules: Iterable[str] = ("triton", "megatron.core", "deepspeed")) -> dict:
    """The record every result file carries: device, versions, threads, load, time, command."""
    env = dict(
        device=device_name(device),
        device_type=device.type,
        versions=versions(modules),
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        command=" ".join([os.path.basename(sys.executable)] + [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        loadavg_start=loadavg(),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return env


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
Column = Tuple[str, str, str]  # (header, row key, format spec: "" for str, ".2f", ...)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """Rows as a Markdown table; a missing value prints as "-"."""

    def cell(row, key, fmt):
        v = row.get(key)
        if v is None:
            return "-"
        return format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)

    lines = [
        md_row(h for h, _, _ in columns),
        "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|",  # numbers right-aligned
    ]
    lines += [md_row(cell(r, k, f) for _, k, f in columns) for r in rows]
    return "\n".join(lines)


class Report:
    """A benchmark's result file, rewritten whole after every step (atomic rename).

    JSON: {"meta": {... environment, "partial": bool, "finished_utc", "loadavg_end"}, <sections>}.
    Markdown (optional): ``render(doc) -> str`` of the same document. Creating a Report makes SIGINT
    raise KeyboardInterrupt even when the parent process ignored it (a time limit's SIGINT, as
    tools/gpu/run.sh sends, must reach the benchmark so that it saves what it measured)."""

    def __init__(
        self, json_path, md_path=None, meta: Optional[dict] = None, render: Optional[Callable[[dict], str]] = None
    ):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.json_path = Path(json_path) if json_path else None
        self.md_path = Path(md_path) if md_path else None
        self.meta = dict(meta or {})
        self.sections: Dict[str, object] = {}
        self.render = render
        for p in (self.json_path, self.md_path):
            if p is not None:
                p.parent.mkdir(parents=True, exist_ok=True)

    def save(self, partial: bool = True, **sections) -> dict:
        self.sections.update(sections)
        doc = {"meta": dict(self.meta, partial=partial, loadavg_now=loadavg()), **self.sections}
        if self.json_path is not None:
            write_text_atomic(self.json_path, json.dumps(doc, indent=1, default=str))
        if self.md_path is not None and self.render is not None:
            write_text_atomic(self.md_path, self.render(doc))
        return doc

    def finish(self, **sections) -> dict:
        self.meta.update(finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), loadavg_end=loadavg())
        return self.save(partial=False, **sections)
