"""Resume on another layout (training/elastic.py): a run stopped at iteration 2 on layout A and
resumed on layout B follows the uninterrupted single-process run (the oracle), in its losses and in
its final weights and Adam moments; on one process (no reduction-order change) bit for bit.

Two single-process reference runs (fp32 ZeRO-0 and bf16 ZeRO-2, checkpoints at 2 and 4) also start
the REF -> X transitions; one torchrun job runs every 2-process start and the resumes on 2
processes; the resumes on 1 process run here. CPU, no dropout, no clipping (train_testlib.BASE).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_testlib import BASE, DEMO, assert_exit_0, run_torchrun

pytestmark = pytest.mark.multiproc
WORKER = str(Path(__file__).with_name("layouts_worker.py"))
SAVE_AT, ITERS = 2, 4  # BASE trains 4 iterations
FINAL = f"iter_{ITERS:07d}"

LAYOUTS = {  # name: (processes, overrides of BASE)
    "dp1_z0": (1, []),
    "dp1_z1": (1, ["parallel.zero_stage=1"]),
    "dp1_z3": (1, ["parallel.zero_stage=3"]),
    "dp2_z0": (2, []),
    "dp2_z1": (2, ["parallel.zero_stage=1"]),
    "dp2_z2": (2, ["parallel.zero_stage=2"]),
    "dp2_z3": (2, ["parallel.zero_stage=3"]),
    "tp2_z1": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=1"]),
    "tp2_z2": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=2"]),
    "pp2_z0": (2, ["parallel.pipeline_parallel=2"]),
    "pp2_z1": (2, ["parallel.pipeline_parallel=2", "parallel.zero_stage=1"]),
}
BF16 = ["precision.dtype=bf16"]
LAYOUTS.update({f"{name}_bf16": (1, LAYOUTS[name][1] + BF16) for name in ("dp1_z1", "dp1_z3")})
LAYOUTS["dp1_z2_bf16"] = (1, ["parallel.zero_stage=2", *BF16])
# The uninterrupted single-process runs, one per dtype: every run is compared with its dtype's; their
# iteration-2 checkpoints start the REF -> X transitions.
REF, REF_BF16 = "dp1_z0", "dp1_z2_bf16"
# (saved at, resumed at): every transition issue 15 names, each data / tensor / pipeline change once
# through the plain torch optimizer (ZeRO-0) and once through DeepSpeed's fragment mappings (ZeRO >= 1)
TRANSITIONS = [
    ("dp2_z1", "dp1_z1"),  # DP 2 -> 1
    (REF, "dp2_z0"),  # DP 1 -> 2
    (REF, "tp2_z2"),  # TP 1 -> 2 (and ZeRO 0 -> 2)
    ("tp2_z1", "dp1_z0"),  # TP 2 -> 1 (and ZeRO 1 -> 0)
    (REF, "pp2_z1"),  # PP 1 -> 2 (and ZeRO 0 -> 1)
    ("pp2_z0", "dp1_z0"),  # PP 2 -> 1
    ("dp2_z1", "dp2_z2"),  # ZeRO 1 -> 2
    ("dp2_z2", "dp2_z3"),  # ZeRO 2 -> 3
    ("dp2_z3", "dp2_z1"),  # ZeRO 3 -> 1
    # on one process no reduction changes: bit-exact (bf16: the fp32 master weights carried over)
    (REF, "dp1_z3"),  # ZeRO 0 -> 3
    (REF_BF16, "dp1_z1_bf16"),  # bf16 ZeRO 2 -> 1 (DeepSpeed's BF16_Optimizer)
    (REF_BF16, "dp1_z3_bf16"),  # bf16 ZeRO 2 -> 3
]
EXACT = {(a, b) for a, b in TRANSITIONS if LAYOUTS[a][0] == LAYOUTS[b][0] == 1}

# Tolerances. Another layout sums the gradients in another order (micro-batches over DP ranks, TP
# partial sums, the tied embedding's two PP copies), a few float32 roundings per element per step,
# which Adam's normalised update carries into the weights and moments: bounded relative to each
# tensor's scale, TOL_ULPS float32 epsilons times the reference tensor's largest magnitude (measured
# here: at most 22 for the weights, 9 for exp_avg, 8 for exp_avg_sq; losses were bit-equal). A resume
# that dropped the moments would differ by beta1^2 * exp_avg(2) etc., millions of these units
# (test_elastic_comparison_sees_dropped_moments).
EPS32 = torch.finfo(torch.float32).eps
TOL_ULPS = 256
LOSS_TOL = 16 * EPS32 * 5.6  # the losses are ~ln(256) = 5.55; the other layouts' curves in test_multiproc: 1e-5


def _tol(reference: torch.Tensor) -> float:
    return TOL_ULPS * EPS32 * float(reference.abs().max())


def _sets(name, ckpt, *extra):
    return LAYOUTS[name][1] + [f"checkpoint.dir={ckpt}", "checkpoint.keep_last=0", *extra]


def _rewind(src: Path, dst: Path) -> Path:
    """A copy of checkpoint dir ``src`` whose latest is the iteration-2 checkpoint (later ones dropped)."""
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        if p.name.startswith("iter_") and p.name > f"iter_{SAVE_AT:07d}":
            shutil.rmtree(p)
    (dst / "latest").write_text(f"iter_{SAVE_AT:07d}\n")
    return dst


def _train_here(name, ckpt, hook=None, extra=()):
    from megatron_outeff.training.config import load_config
    from megatron_outeff.training.train import train

    assert LAYOUTS[name][0] == 1
    return [loss for _, loss in train(load_config(DEMO, BASE + _sets(name, ckpt, *extra)), model_hook=hook)["history"]]


def _dtype(name):
    return "bf16" if "precision.dtype=bf16" in LAYOUTS[name][1] else "fp32"


REFS = {"fp32": REF, "bf16": REF_BF16}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{ref name: {"losses", "dir"}, (A, B): {"losses": part1 + part2, "dir": its checkpoint dir, "ref": ref name}}."""
    from layouts_worker import weights_hook

    out = tmp_path_factory.mktemp("elastic")
    weights = out / "initial_weights.pt"  # pipeline starts load them (a stage draws other initial weights)
    result = {}
    for ref in REFS.values():
        hook = weights_hook(str(weights)) if ref == REF else None  # the fp32 reference's initial weights
        result[ref] = {
            "losses": _train_here(ref, out / ref, hook, [f"checkpoint.save_interval={SAVE_AT}"]),
            "dir": out / ref,
        }
    tdir = {t: out / f"{t[0]}_to_{t[1]}" for t in TRANSITIONS}
    starts = {a for a, _ in TRANSITIONS if a not in result}
    assert all(LAYOUTS[a][0] == 2 for a in starts)
    for a, b in TRANSITIONS:
        if a in result:
            _rewind(out / a, tdir[(a, b)])
    # One torchrun job: the 2-process starts (stopped at iteration 2), then the resumes on 2 processes
    # (from a start's own directory: each start continues on at most one 2-process layout).
    layouts = [
        f"start_{a}:" + ",".join(_sets(a, out / f"start_{a}", f"train.exit_interval={SAVE_AT}")) for a in sorted(starts)
    ]
    in_job = [t for t in TRANSITIONS if LAYOUTS[t[1]][0] == 2]
    assert len({a for a, _ in in_job if a in starts}) == len([a for a, _ in in_job if a in starts])
    for a, b in in_job:
        if a in starts:
            tdir[(a, b)] = out / f"start_{a}"
        layouts.append(f"{a}_to_{b}:" + ",".join(_sets(b, tdir[(a, b)])))
    assert_exit_0(run_torchrun(WORKER, out / "job.json", *layouts, timeout=900, WEIGHTS=str(weights)))
    job = json.loads((out / "job.json").read_text())
    for a, b in TRANSITIONS:
        assert _dtype(a) == _dtype(b)
        ref = REFS[_dtype(a)]
        first = result[a]["losses"][:SAVE_AT] if a in result else job[f"start_{a}"]
        if LAYOUTS[b][0] == 2:
            second = job[f"{a}_to_{b}"]
        else:  # resumed here, from a copy of the start rewound to iteration 2
            if a in starts:
                _rewind(out / f"start_{a}", tdir[(a, b)])
            second = _train_here(b, tdir[(a, b)])
        assert len(first) == SAVE_AT and len(second) == ITERS - SAVE_AT, (a, b, first, second)
        result[(a, b)] = {"losses": first + second, "dir": tdir[(a, b)], "ref": ref}
    return result


def _full(ckpt: Path, sub: str, iteration: int = ITERS) -> dict:
    """A checkpoint's tensors of model/ or optimizer/<moment>/, merged to one full (Hugging Face-named)
    state with the model files' own reader and merge rule."""
    from megatron_outeff.checkpoint_format import manifest_arch_variant, merge_ranks, read_model_files

    manifest, states = read_model_files(ckpt / f"iter_{iteration:07d}" / sub)  # bf16: the fp32 master weights
    arch, variant = manifest_arch_variant(manifest)
    hf, padded = merge_ranks(states, arch, variant)
    return {**hf, **{f"padded {k}": v for k, v in padded.items()}}


@pytest.mark.parametrize("transition", TRANSITIONS, ids=[f"{a}->{b}" for a, b in TRANSITIONS])
def test_elastic_resume_follows_the_uninterrupted_run(runs, transition):
    """Losses, final weights and final Adam moments of (A to iteration 2, B from there to 4) against
    the uninterrupted single-process run; the LR schedule, Adam step and data position carried over."""
    run = runs[transition]
    ref = runs[run["ref"]]
    assert run["losses"] == pytest.approx(ref["losses"], abs=LOSS_TOL, rel=0), run["losses"]
    meta = json.loads((run["dir"] / FINAL / "optimizer" / "state.json").read_text())
    assert meta["step"] == ITERS and meta["scheduler"] == {"num_steps": ITERS} and meta["global_steps"] == ITERS
    train_state = json.loads((run["dir"] / FINAL / "train_state.json").read_text())
    assert train_state["data"]["consumed_samples"] == ITERS * 4  # BASE: global batch 4
    measured = [f"loss max |d| {max(abs(a - b) for a, b in zip(run['losses'], ref['losses'])):.3g}"]
    for sub in ("model", "optimizer/exp_avg", "optimizer/exp_avg_sq"):
        got, want = _full(run["dir"], sub), _full(ref["dir"], sub)
        assert sorted(got) == sorted(want)
        worst = max(float((got[k] - want[k]).abs().max()) / (_tol(want[k]) / TOL_ULPS or 1.0) for k in want)
        measured.append(f"{sub.split('/')[-1]} {worst:.3g}")
        for k in want:
            if transition in EXACT:
                assert torch.equal(got[k], want[k]), (sub, k)
            else:
                torch.testing.assert_close(
                    got[k], want[k], rtol=0, atol=_tol(want[k]), msg=lambda m, sub=sub, k=k: f"{sub} {k}: {m}"
                )
    if transition in EXACT:
        assert run["losses"] == ref["losses"]
    # shown with pytest -rP: the largest difference per tensor in float32 epsilons of its largest magnitude
    print(f"elastic {transition[0]} -> {transition[1]}: " + ", ".join(measured))


def test_elastic_comparison_sees_dropped_moments(runs):
    """The moment check can fail: Adam's recursion gives exp_avg(4) = beta1^2 exp_avg(2) + (terms of
    steps 3 and 4), exp_avg_sq likewise with beta2, so a resume that dropped the moments would be off by
    beta^2 times the iteration-2 moments, which exceeds the tolerance in every tensor that has them."""
    from megatron_outeff.training.config import load_config

    betas = load_config(DEMO, BASE).optimizer.betas
    for key, beta in zip(("exp_avg", "exp_avg_sq"), betas):
        saved = _full(runs[REF]["dir"], f"optimizer/{key}", iteration=SAVE_AT)
        final = _full(runs[REF]["dir"], f"optimizer/{key}")
        moved = [k for k in saved if saved[k].abs().max() > 0]
        assert len(moved) > len(saved) // 2, key  # most tensors have moments (not padding, unused positions)
        for k in moved:
            assert float((beta ** (ITERS - SAVE_AT) * saved[k]).abs().max()) > 1000 * _tol(final[k]), (key, k)


def test_elastic_fingerprint_ignores_the_layout_not_the_global_batch():
    import dataclasses

    from megatron_outeff.training.config import LAYOUT_KEYS, ParallelConfig, load_config

    base = load_config(DEMO, BASE)
    other = load_config(
        DEMO,
        BASE
        + [
            "parallel.tensor_parallel=2",
            "parallel.pipeline_parallel=2",
            "parallel.zero_stage=1",
            "parallel.sequence_parallel=true",
            "parallel.micro_batch_size=2",
        ],
    )
    assert other.fingerprint() == base.fingerprint()
    assert load_config(DEMO, BASE + ["parallel.global_batch_size=8"]).fingerprint() != base.fingerprint()
    # every parallel key but the global batch: a key added to the section must be classed here too
    assert set(LAYOUT_KEYS) == {f.name for f in dataclasses.fields(ParallelConfig)} - {"global_batch_size"}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _main_error(capsys, ckpt, *sets):
    """Run the training CLI in this process; (exit code, stderr lines)."""
    from megatron_outeff.training.train import main

    args = ["--config", DEMO]
    for s in BASE + [f"checkpoint.dir={ckpt}", *sets]:
        args += ["--set", s]
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def test_elastic_bad_layout_is_one_line_and_writes_nothing(runs, capsys, tmp_path):
    """A layout that cannot divide the model (4 heads over tensor_parallel=3), and a checkpoint without
    per-parameter optimizer state resumed at another layout: exit 2, one line naming the value and
    what was expected, the checkpoint directory untouched."""
    ckpt = _rewind(runs[REF]["dir"], tmp_path / "ck")
    before = _snapshot(ckpt)
    code, err = _main_error(capsys, ckpt, "parallel.tensor_parallel=3")
    assert code == 2 and len(err) == 1, err
    assert "num_attention_heads=4" in err[0] and "tensor parallel size 3" in err[0], err
    assert _snapshot(ckpt) == before

    old = _rewind(runs[("dp2_z1", "dp1_z1")]["dir"], tmp_path / "old")  # saved at DP 2, ZeRO-1
    shutil.rmtree(old / f"iter_{SAVE_AT:07d}" / "optimizer")  # as written before elastic resume
    before = _snapshot(old)
    code, err = _main_error(capsys, old, "parallel.zero_stage=1")  # one process: DP 1
    assert code == 2 and len(err) == 1, err
    assert "saved at DP 2 x TP 1 x PP 1, ZeRO-1" in err[0] and "not at DP 1 x TP 1 x PP 1, ZeRO-1" in err[0], err
    assert _snapshot(old) == before


def test_elastic_vocabulary_rows_must_divide(tmp_path):
    """OPT's 50272 rows (saved at TP 1) cannot be split over tensor_parallel=3 (12 heads can): the resume
    check names the rows and the size, before anything is built."""
    from megatron_outeff.checkpoint_format import make_manifest, write_manifest
    from megatron_outeff.megatron.variant import AttentionVariantConfig
    from megatron_outeff.training import elastic
    from megatron_outeff.training.config import load_config
    from megatron_outeff.training.model import arch_config

    saved = load_config(None, ["model.arch=125m"])
    tag = tmp_path / "iter_0000002"
    write_manifest(
        tag / "model",
        make_manifest(
            arch=arch_config(saved),
            variant=AttentionVariantConfig(),
            tp=1,
            pp=1,
            padded_vocab_size=50272,
            dtype="fp32",
            seq_length=32,
            iteration=2,
            source="training",
        ),
    )
    (tag / "optimizer").mkdir()
    (tag / "optimizer" / "state.json").write_text("{}")
    (tag / "train_state.json").write_text(json.dumps({"iteration": 2, "layout": elastic.layout(saved, 1)}))
    assert elastic.check_resume(saved, tag, 1) is None  # same layout: DeepSpeed's own files
    assert elastic.check_resume(load_config(None, ["model.arch=125m", "parallel.tensor_parallel=2"]), tag, 2) is None
    error = elastic.check_resume(load_config(None, ["model.arch=125m", "parallel.tensor_parallel=3"]), tag, 3)
    assert error and "parallel.tensor_parallel=3" in error and "50272 vocabulary rows" in error, error


def test_elastic_unreadable_manifest_is_a_reason_not_a_traceback(tmp_path):
    """A checkpoint at another layout whose model manifest is corrupt: the resume check returns one line
    naming the file (rank 0 decides and broadcasts; an exception there would leave the others waiting)."""
    from megatron_outeff.training import elastic
    from megatron_outeff.training.config import load_config

    saved = load_config(None, ["model.arch=125m"])
    tag = tmp_path / "iter_0000002"
    (tag / "model").mkdir(parents=True)
    (tag / "model" / "manifest.json").write_text("{not json")
    (tag / "optimizer").mkdir()
    (tag / "optimizer" / "state.json").write_text("{}")
    (tag / "train_state.json").write_text(json.dumps({"iteration": 2, "layout": elastic.layout(saved, 1)}))
    error = elastic.check_resume(load_config(None, ["model.arch=125m", "parallel.tensor_parallel=2"]), tag, 2)
    assert error and "manifest.json: unreadable" in error and "\n" not in error, error
