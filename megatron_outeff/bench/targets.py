"""The project's performance targets, one owner: the benchmarks check them per shape (``check``), the
GPU check's summary aggregates them (``aggregate``: the worst shape; met only if every shape meets it).
No torch import (tools/gpu/summarize.py reads results with the standard library only).

GPU targets (issue 20; H100/H200, bf16, causal, sq 2k-16k, d 64 and 128; ratios against torch SDPA
vanilla timed in the same process with the same SDPA backend), reported in the GPU check's
summary.json as {value, goal, op, met, detail}:

| key | source | goal |
|---|---|---|
| softmax1_fwdbwd_vs_sdpa | bench_attention | Softmax_1 fwd+bwd <= 1.05x SDPA vanilla |
| learnable_fwdbwd_vs_sdpa | bench_attention | learnable offset fwd+bwd <= 1.05x |
| gated_fwdbwd_vs_sdpa | bench_attention | gated Softmax_1 fwd+bwd <= 1.10x |
| clipped_fwdbwd_vs_sdpa | bench_attention | clipped Softmax_1 fwd+bwd <= 2.0x |
| softmax1_speedup_vs_mcore_offbyone_s4096 | bench_attention | >= 3x faster than megatron-core's off-by-one at sq 4096 |
| softmax1_memory_growth_per_doubling_s | bench_attention | peak memory <= 2.5x per doubling of sq (linear in sq) |
| opt125m_softmax1_tokens_per_s_vs_vanilla | bench_train | OPT-125m training tokens/s with Softmax_1 >= 0.98x vanilla |
| opt125m_softmax1_mfu | bench_train | reported (model FLOPs utilisation, no goal) |

CPU targets (issue 14; fp32, d 64, causal, b 1, h 8; checked by bench_attention on CPU):
C1 Softmax_1 / learnable fwd+bwd <= 1.3x SDPA (sq 512-4096); C2 >= 3x faster than megatron-core's
off-by-one at sq 2048; C3 peak memory <= 2x SDPA's; C4 the clipped CPU path no slower than the
reference's clipped path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence


@dataclass(frozen=True)
class Target:
    key: str  # summary.json's name
    source: str  # the benchmark that measures it (its JSON file's stem)
    what: str  # one line for people
    goal: Optional[float]  # None: reported only
    op: str  # "<=" | ">=" | "report"
    sq_range: Optional[tuple] = None  # the sequence lengths it holds over (inclusive), None: as measured

    def met(self, value: float) -> Optional[bool]:
        if self.op == "report":
            return None
        return value <= self.goal if self.op == "<=" else value >= self.goal

    def applies(self, sq: Optional[int]) -> bool:
        return self.sq_range is None or sq is None or self.sq_range[0] <= sq <= self.sq_range[1]


GPU_SQ = (2048, 16384)
GPU_TARGETS: List[Target] = [
    Target(
        "softmax1_fwdbwd_vs_sdpa",
        "bench_attention",
        "Softmax_1 fwd+bwd <= 1.05x SDPA vanilla (same backend)",
        1.05,
        "<=",
        GPU_SQ,
    ),
    Target(
        "learnable_fwdbwd_vs_sdpa",
        "bench_attention",
        "learnable offset fwd+bwd <= 1.05x SDPA vanilla (same backend)",
        1.05,
        "<=",
        GPU_SQ,
    ),
    Target(
        "gated_fwdbwd_vs_sdpa", "bench_attention", "gated Softmax_1 fwd+bwd <= 1.10x SDPA vanilla", 1.10, "<=", GPU_SQ
    ),
    Target(
        "clipped_fwdbwd_vs_sdpa", "bench_attention", "clipped Softmax_1 fwd+bwd <= 2.0x SDPA vanilla", 2.0, "<=", GPU_SQ
    ),
    Target(
        "softmax1_speedup_vs_mcore_offbyone_s4096",
        "bench_attention",
        "Softmax_1 >= 3x faster (fwd+bwd) than megatron-core's off-by-one at sq 4096",
        3.0,
        ">=",
        (4096, 4096),
    ),
    Target(
        "softmax1_memory_growth_per_doubling_s",
        "bench_attention",
        "Softmax_1 peak memory per sequence <= 2.5x per doubling of sq (linear in sq)",
        2.5,
        "<=",
    ),
    Target(
        "opt125m_softmax1_tokens_per_s_vs_vanilla",
        "bench_train",
        "OPT-125m Softmax_1 tokens/s >= 0.98x vanilla",
        0.98,
        ">=",
    ),
    Target(
        "opt125m_softmax1_mfu", "bench_train", "OPT-125m Softmax_1 model FLOPs utilisation (reported)", None, "report"
    ),
]
CPU_TARGETS: List[Target] = [
    Target(
        "C1_softmax1_fwdbwd_vs_sdpa", "bench_attention", "C1 Softmax_1 fwd+bwd <= 1.3x SDPA", 1.3, "<=", (512, 4096)
    ),
    Target(
        "C1_learnable_fwdbwd_vs_sdpa", "bench_attention", "C1 learnable fwd+bwd <= 1.3x SDPA", 1.3, "<=", (512, 4096)
    ),
    Target(
        "C2_softmax1_speedup_vs_mcore_offbyone_s2048",
        "bench_attention",
        "C2 Softmax_1 >= 3x faster than megatron-core's off-by-one at sq 2048",
        3.0,
        ">=",
        (2048, 2048),
    ),
    Target("C3_softmax1_memory_vs_sdpa", "bench_attention", "C3 Softmax_1 peak memory <= 2x SDPA's", 2.0, "<="),
    Target("C3_learnable_memory_vs_sdpa", "bench_attention", "C3 learnable peak memory <= 2x SDPA's", 2.0, "<="),
    Target(
        "C4_clipped_vs_reference_clipped",
        "bench_attention",
        "C4 clipped CPU path fwd+bwd <= the reference's clipped path",
        1.0,
        "<=",
    ),
]
TARGETS: Dict[str, Target] = {t.key: t for t in GPU_TARGETS + CPU_TARGETS}


def check(key: str, value: Optional[float], **where) -> Optional[dict]:
    """One measurement of target ``key`` at ``where`` (dtype, d, sq, ...): {key, target, value, goal,
    op, met, **where}; None when value is None or the shape lies outside the target's range."""
    t = TARGETS[key]
    if value is None or not t.applies(where.get("sq")):
        return None
    return dict(key=key, target=t.what, **where, value=float(value), goal=t.goal, op=t.op, met=t.met(float(value)))


def aggregate(checks: Sequence[dict], key: str) -> dict:
    """The worst of target ``key``'s checks (the largest value for "<=", the smallest for ">=", the
    last for "report"): {value, goal, op, met, detail}; value and met null when nothing measured it."""
    t = TARGETS[key]
    mine = [c for c in checks if c.get("key") == key and c.get("value") is not None]
    if not mine:
        return {"value": None, "goal": t.goal, "op": t.op, "met": None, "detail": "not measured"}
    if t.op == "report":
        worst, met = mine[-1], None
    else:
        worst = (max if t.op == "<=" else min)(mine, key=lambda c: c["value"])
        met = all(t.met(c["value"]) for c in mine)
    where = {k: worst[k] for k in ("dtype", "d", "sq", "kernel") if worst.get(k) is not None}
    return {
        "value": worst["value"],
        "goal": t.goal,
        "op": t.op,
        "met": met,
        "detail": f"worst of {len(mine)} measurement(s)" + (f" at {where}" if where else ""),
    }
