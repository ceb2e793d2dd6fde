"""The shared benchmark harness, the one list of benchmarked variants and the targets
(megatron_outeff/bench/): the mechanics, not speed (speed lives in the benchmarks' committed output)."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
import yaml

from megatron_outeff.bench import harness
from megatron_outeff.bench.targets import GPU_TARGETS, TARGETS, aggregate, check
from megatron_outeff.bench.variants import BENCH_VARIANTS, attention_flops, attention_kwargs, config_overrides, select
from megatron_outeff.ops import AttentionVariantConfig, outeff_attention

CPU = torch.device("cpu")


def test_round_robin_rotates_and_drops_warmup():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    rounds = []
    samples = harness.round_robin(fns, warmup=1, repeats=2, device=CPU, after_round=lambda r, s: rounds.append(r))
    assert calls == list("abcbcacab")  # one call each per round, order rotating
    assert rounds == [0, 1, 2]
    assert all(len(s.ms) == 2 and s.ok for s in samples.values())  # the warm-up round is not timed


def test_round_robin_without_interleave_and_rotation():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "ab"}
    harness.round_robin(fns, warmup=0, repeats=2, device=CPU, interleave=False)
    assert calls == list("aabb")
    calls.clear()
    harness.round_robin(fns, warmup=0, repeats=2, device=CPU, rotate=False)
    assert calls == list("abab")


def test_a_failing_function_is_dropped_with_its_reason():
    def boom():
        raise RuntimeError("no kernel\nsecond line")

    samples = harness.round_robin({"ok": lambda: None, "bad": boom}, warmup=0, repeats=3, device=CPU)
    assert samples["ok"].ok and len(samples["ok"].ms) == 3
    assert not samples["bad"].ok and samples["bad"].error == "error: RuntimeError: no kernel"
    assert harness.ratio(samples, "bad", "ok") is None


def test_ratio_and_stats():
    s = {"x": harness.Samples(ms=[2.0, 4.0, 6.0]), "base": harness.Samples(ms=[1.0, 2.0, 3.0])}
    assert s["x"].median == 4.0 and s["x"].min == 2.0
    assert harness.ratio(s, "x", "base") == 2.0 and harness.ratio(s, "x", "base", "min") == 2.0


def test_report_is_rewritten_whole_and_marks_partial(tmp_path):
    seen = []
    rep = harness.Report(
        tmp_path / "r.json",
        tmp_path / "r.md",
        {"device": "cpu"},
        render=lambda doc: seen.append(doc) or f"rows {len(doc['rows'])}\n",
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # a time limit's SIGINT reaches it
    rep.save(rows=[{"a": 1}])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["meta"]["partial"] is True and doc["rows"] == [{"a": 1}] and "loadavg_now" in doc["meta"]
    rep.finish(rows=[{"a": 1}, {"a": 2}])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["meta"]["partial"] is False and "finished_utc" in doc["meta"] and len(doc["rows"]) == 2
    assert (tmp_path / "r.md").read_text() == "rows 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temporary left


def test_environment_and_table():
    env = harness.environment(CPU, modules=("yaml",))
    assert (
        env["device_type"] == "cpu"
        and env["device"].startswith("CPU:")
        and env["versions"]["torch"] == torch.__version__
    )
    assert env["cpu_capability"] and env["started_utc"].endswith("Z")
    table = harness.markdown_table([{"a": "x", "b": 1.234}, {"a": "y"}], [("A", "a", ""), ("B", "b", ".1f")])
    assert table.splitlines() == ["| A | B |", "|---|---:|", "| x | 1.2 |", "| y | - |"]


def test_memory_helpers():
    assert harness.rss_mib() > 0 and harness.peak_rss_mib() >= harness.rss_mib() * 0.5
    import sys

    assert harness.probe_subprocess([sys.executable, "-c", "print('noise'); print('{\"peak_mib\": 12.5}')"]) == 12.5
    assert harness.probe_subprocess([sys.executable, "-c", "print('nothing')"]) is None


# ------------------------------------------------------------------------------------------------
# the one list of variants
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BENCH_VARIANTS))
def test_config_overrides_rebuild_the_variant(name):
    """The training config's attention.<field>=<value> overrides give back the very variant."""
    fields = {}
    for o in config_overrides(BENCH_VARIANTS[name]):
        key, value = o.split("=", 1)
        assert key.startswith("attention.")
        fields[key[len("attention.") :]] = yaml.safe_load(value)
    assert AttentionVariantConfig.from_dict(fields) == BENCH_VARIANTS[name]


@pytest.mark.parametrize("name", list(BENCH_VARIANTS))
def test_attention_kwargs_run(name):
    v = BENCH_VARIANTS[name]
    q = torch.randn(1, 16, 2, 8, requires_grad=True)
    kw = attention_kwargs(v, b=1, s=16, h=2, device=CPU, dtype=torch.float32)
    if v.clipped:
        assert kw["clip"] == (-12.0 / 16, 1.0)
    if v.gated:
        assert kw["gate"].shape == (1, 16, 2) and 0 < kw["gate"].min() and kw["gate"].max() < 1
    outeff_attention(q, q, q, **kw).sum().backward()
    if v.learnable_offset:
        assert kw["offset"].grad is not None


def test_select():
    assert list(select(["softmax1", "vanilla"])) == ["softmax1", "vanilla"]
    with pytest.raises(ValueError, match="benchmark variant 'nope'"):
        select(["nope"])


def test_attention_flops():
    assert attention_flops(1, 2, 1, 1, causal=False, backward=False) == 16.0
    assert attention_flops(2, 1024, 16, 128) == pytest.approx(4 * 2 * 16 * 1024**2 * 128 * 0.5 * 3.5)


# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------
def test_targets_range_worst_and_report():
    assert check("softmax1_fwdbwd_vs_sdpa", 1.2, sq=1024) is None  # outside 2k-16k
    assert check("softmax1_fwdbwd_vs_sdpa", None, sq=4096) is None
    checks = [check("softmax1_fwdbwd_vs_sdpa", v, sq=sq, d=128) for v, sq in ((1.01, 2048), (1.07, 4096), (1.0, 16384))]
    agg = aggregate(checks, "softmax1_fwdbwd_vs_sdpa")
    assert agg["value"] == 1.07 and agg["met"] is False and "4096" in agg["detail"]
    up = [check("softmax1_speedup_vs_mcore_offbyone_s4096", v, sq=4096) for v in (3.5, 2.9)]
    assert aggregate(up, "softmax1_speedup_vs_mcore_offbyone_s4096")["value"] == 2.9
    mfu = aggregate([check("opt125m_softmax1_mfu", 0.4)], "opt125m_softmax1_mfu")
    assert mfu["value"] == 0.4 and mfu["met"] is None and mfu["op"] == "report"
    assert aggregate([], "clipped_fwdbwd_vs_sdpa") == dict(
        value=None, goal=2.0, op="<=", met=None, detail="not measured"
    )
    assert {t.key for t in GPU_TARGETS} <= set(TARGETS) and not math.isnan(TARGETS["gated_fwdbwd_vs_sdpa"].goal)


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--variants", "vanilla", "bogus"], "--variants: benchmark variant 'bogus'"),
        (["--variants", "softmax1"], "expected 'vanilla' among them"),
    ],
)
def test_bench_train_refuses_unknown_variants(tmp_path, args, pattern):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, str(root / "tools/bench_train.py"), *args, "--output-json", str(tmp_path / "b.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and pattern in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["bench_attention", "bench_int8_linear", "bench_layer", "bench_train"])
def test_every_benchmark_takes_the_harness_output_options(script):
    """The four benchmarks' result files are the harness's options (one wording, one behaviour), not their own."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, str(root / "tools" / f"{script}.py"), "--help"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "--output-json OUTPUT_JSON the results as JSON, rewritten after every step (default:" in text, text
    assert "--output-md OUTPUT_MD the results as a Markdown table (default:" in text, text
