"""The experiment runner end to end at tiny size (the GPU configuration shrunk: two arms, a few
steps, bf16 on CPU), its continuation after a finished arm, and its refusals of bad input."""

import json
import runpy
from pathlib import Path

import pytest
from evallib import run_experiment

from megatron_outeff.errors import OutEffError
from megatron_outeff.evaluation.experiment import ClaimConfig, judge, load_experiment, positive_control

ROOT = Path(__file__).resolve().parents[2]
main = runpy.run_path(str(ROOT / "tools" / "run_experiment.py"))["main"]
GPU_CONFIG = ROOT / "configs" / "experiments" / "bb-sink-gpu.yaml"
CPU_CONFIG = ROOT / "configs" / "experiments" / "bb-sink-cpu.yaml"
MASSIVE_CPU_CONFIG = ROOT / "configs" / "experiments" / "bb-massive-cpu.yaml"
TINY = [
    "arms=[vanilla, softmax1]",
    "training.model.arch_overrides={num_layers: 2, hidden_size: 32, num_attention_heads: 2, ffn_hidden_size: 64, "
    "vocab_size: 16, max_position_embeddings: 16, hidden_dropout: 0.0, attention_dropout: 0.0}",
    "training.data.seq_length=16",
    "training.data.bigram_backcopy.vocab_size=16",
    "training.parallel.micro_batch_size=4",
    "training.parallel.global_batch_size=4",
    "training.train.train_iters=4",
    "training.logging.outlier_interval=2",
    "training.logging.log_interval=2",
    "training.schedule.warmup_iters=1",
    "training.checkpoint.save_interval=0",
    "evaluation={heldout_sequences: 8, calib_batches: 1, calib_batch_size: 4, batch_size: 4}",
]
FINAL_KEYS = (
    "loss",
    "loss_copy",
    "loss_bigram",
    "first_token_mass_idle",
    "sink_mass",
    "bos_residual_norm_ratio",
    "max_inf_norm",
    "avg_kurtosis",
    "ppl_fp32",
    "ppl_w8a8_paper",
    "ppl_w8a8_deployable",
    "quantized_activation_count",
)


def test_runner_end_to_end_tiny(tmp_path):
    out = tmp_path / "exp"
    r = run_experiment(GPU_CONFIG, out, TINY, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "arm 1/2: vanilla" in r.stdout and "[softmax1] iter 2" in r.stdout  # progress
    rep = json.loads((out / "report.json").read_text())
    assert (
        rep["wall_seconds"] > 0
        and isinstance(rep["positive_control"], bool)
        and isinstance(rep["effect_claimed"], bool)
    )
    for arm in ("vanilla", "softmax1"):
        final = rep["arms"][arm]["final"]
        for k in FINAL_KEYS:
            assert final.get(k) is not None, (arm, k)
        assert [p[0] for p in rep["arms"][arm]["curve"]["first_token_mass_idle"]] == [2, 4]
        assert [p[0] for p in rep["arms"][arm]["curve"]["probe_loss_copy"]] == [2, 4]
        assert final["loss"] == pytest.approx(__import__("math").log(final["ppl_fp32"]), rel=1e-4)
    # like-for-like: the same quantized op set size in both arms; vanilla has no sink, Softmax_1 one
    assert (
        rep["arms"]["vanilla"]["final"]["quantized_activation_count"]
        == rep["arms"]["softmax1"]["final"]["quantized_activation_count"]
    )
    assert rep["arms"]["vanilla"]["final"]["sink_mass"] == pytest.approx(0.0, abs=1e-6)
    assert rep["arms"]["softmax1"]["final"]["sink_mass"] > 0.0
    assert (out / "report.md").read_text().startswith("# Experiment bb-sink-gpu")
    assert (out / "first_token_mass_idle.png").is_file() and (out / "bos_residual_norm_ratio.png").is_file()
    # re-running continues: finished arms are skipped, the report is rewritten
    r2 = run_experiment(GPU_CONFIG, out, TINY, tmp_path)
    assert r2.returncode == 0 and r2.stdout.count("already complete") == 2, r2.stdout[-2000:] + r2.stderr[-2000:]
    # another experiment in the same directory is refused, nothing touched
    before = sorted(p.name for p in out.iterdir())
    r3 = run_experiment(GPU_CONFIG, out, ["arms=[vanilla]"], tmp_path)
    assert r3.returncode == 2 and "holds another experiment" in r3.stderr and len(r3.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before


# bb-sink-cpu (the list form) and bb-massive-cpu (the mapping form of issue 21: rules naming arms that are
# not in the experiment, bit widths outside 2-16, an arm an optimizer cannot serve)
@pytest.mark.parametrize(
    "config, override, message",
    [
        (CPU_CONFIG, "arms=[vanilla, sotfmax1]", "unknown arm 'sotfmax1'"),
        (CPU_CONFIG, "training.data.source=synthetic", "data.source='synthetic'"),
        (CPU_CONFIG, "training.data.source=bigram", "data.source='bigram'"),
        (CPU_CONFIG, "training.data.bigram_backcopy.num_triggers=200", "num_triggers=200"),
        (CPU_CONFIG, "training.data.seq_length=2", "seq_length=2"),
        (CPU_CONFIG, "training.logging.outlier_interval=7", "outlier_interval=7"),
        (
            MASSIVE_CPU_CONFIG,
            "claim.rules=[{rule: removes_channel_outliers, arms: [vanilla_sdg]}]",
            "claim.rules[0] (removes_channel_outliers) refers to arm 'vanilla_sdg', which is not in this experiment",
        ),
        (MASSIVE_CPU_CONFIG, "claim.baseline=vanilla", "claim.baseline='vanilla': not an arm of this experiment"),
        (
            MASSIVE_CPU_CONFIG,
            "evaluation.act_bits=[8, 6, 1]",
            "evaluation.act_bits=1: expected an integer bit width from 2 to 16",
        ),
        (
            MASSIVE_CPU_CONFIG,
            "evaluation.act_bits=[8, 17]",
            "evaluation.act_bits=17: expected an integer bit width from 2 to 16",
        ),
        (
            MASSIVE_CPU_CONFIG,
            "evaluation.weight_bits=32",
            "evaluation.weight_bits=32: expected an integer bit width from 2 to 16",
        ),
        (
            MASSIVE_CPU_CONFIG,
            "arms.vanilla_orthoadam.optimizer.type=adamx",
            "arms.vanilla_orthoadam: optimizer.type='adamx'",
        ),
        (
            MASSIVE_CPU_CONFIG,
            "training.parallel.zero_stage=1",
            "arms.vanilla_orthoadam: optimizer.type=orthoadam with parallel.zero_stage=1",
        ),
        (
            MASSIVE_CPU_CONFIG,
            "claim.rules=[{rule: removes_everything, arms: [vanilla_sgd]}]",
            "claim.rules[0].rule='removes_everything'",
        ),
        (MASSIVE_CPU_CONFIG, "seeds=[1, 1]", "seeds=[1, 1]: expected a non-empty list of distinct integers"),
        (
            MASSIVE_CPU_CONFIG,
            "claim.pipeline_control.bits=3",
            "claim.pipeline_control.bits=3: not one of evaluation.act_bits",
        ),
        (MASSIVE_CPU_CONFIG, "jobs=0", "jobs=0: expected an integer >= 1"),
    ],
)
def test_bad_input_one_line_nothing_written(tmp_path, capsys, config, override, message):
    out = tmp_path / "never"
    assert main(["--config", str(config), "--output-dir", str(out), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_non_empty_foreign_dir_refused(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["--config", str(CPU_CONFIG), "--output-dir", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def _result(idle_curve, ratio_curve, loss):
    curve = {
        "first_token_mass_idle": [[i * 10, v] for i, v in enumerate(idle_curve, 1)],
        "bos_residual_norm_ratio": [[i * 10, v] for i, v in enumerate(ratio_curve, 1)],
    }
    return {
        "curve": curve,
        "final": {"first_token_mass_idle": idle_curve[-1], "bos_residual_norm_ratio": ratio_curve[-1], "loss": loss},
    }


def test_claim_rule_by_hand():
    c = ClaimConfig()
    vanilla = _result([0.1, 0.5, 0.8, 0.82, 0.81], [1.0, 3.0, 10.0, 10.5, 10.0], 1.00)
    assert positive_control(vanilla, c)["passed"]
    results = {
        "vanilla": vanilla,
        "good": _result([0.1, 0.1, 0.1, 0.1, 0.15], [1.0, 1.2, 1.5, 1.8, 1.9], 1.015),  # 5.4x, 5.3x, +1.5%
        "weak": _result([0.1, 0.1, 0.1, 0.1, 0.2], [1.0, 1.2, 1.5, 1.8, 1.9], 1.00),  # idle only 4.05x
        "worse": _result([0.1, 0.1, 0.1, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0], 1.03),
    }  # loss +3%
    v = judge(results, c)
    assert v["positive_control"] and v["effect_claimed"] and v["effect_arms"] == ["good"]
    assert (
        not v["arms"]["weak"]["removes_sink"]
        and v["arms"]["worse"]["removes_sink"]
        and not v["arms"]["worse"]["equal_loss"]
    )
    # no plateau (still rising) -> control fails -> no claim
    rising = _result([0.1, 0.3, 0.5, 0.7, 0.9], [1.0, 3.0, 10.0, 10.5, 10.0], 1.00)
    assert not judge({**results, "vanilla": rising}, c)["effect_claimed"]


def test_experiment_configs_load():
    for path in (CPU_CONFIG, GPU_CONFIG):
        exp = load_experiment(path)
        assert list(exp.arms) == ["vanilla", "softmax1", "learnable", "gated_softmax1", "clipped_softmax1"]
        assert exp.legacy and exp.seeds == [1234] and [r.dir.as_posix() for r in exp.runs()][0] == "arms/vanilla"
    with pytest.raises(OutEffError, match="unknown config key 'claim.fator'"):
        load_experiment(CPU_CONFIG, ["claim.fator=3"])
