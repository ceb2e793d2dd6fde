"""The outlier experiment: train every arm (attention variant x optimizer) with each seed on
Bigram-Backcopy through the real training stack, evaluate each run, judge the pre-registered rules, report.

    python tools/run_experiment.py --config configs/experiments/bb-massive-cpu.yaml --output-dir OUT_DIR [--set k=v ...]

An experiment YAML (configs/experiments/*.yaml):
    name:       a label
    arms:       {arm name: overlay} -- the overlay's ``attention`` / ``optimizer`` mappings are merged
                over the shared training config (e.g. {attention: {softmax: learnable}, optimizer: {type:
                orthoadam}}); or, the earlier form, a list of names from ARMS (attention variants)
    seeds:      train.seed of each run of every arm (initialisation and data order; the task's bigram
                matrix stays data.bigram_backcopy.seed); default [training.train.seed]
    jobs:       runs at once, one process each with one intra-op thread (default: the CPU count)
    time_limit_s: stop each run's training after this many seconds (SIGTERM: the trainer finishes its
                step, saves and exits); runs are then compared over their common step range (GPU form)
    training:   a complete training config (megatron_outeff.training.config) shared by all arms;
                data.source must be bigram_backcopy and logging.outlier_interval must divide
                train.train_iters (the last probe is the final measurement)
    evaluation: heldout_sequences, calib_batches, calib_batch_size, batch_size; act_bits (a sweep of
                the paper protocol over activation widths, e.g. [8, 6, 5, 4]; 2-16), weight_bits,
                sensitivity_tolerance; deployable (also FP16 and the compressed-tensors W8A8 export)
    claim:      the pre-registered rule: ``ClaimConfig`` (the list form of arms) or ``RulesClaim``
                (baseline, control, pipeline_control, rules; see ``judge_rules``)

Per run, under OUT_DIR/arms/<arm>/ (list form) or OUT_DIR/arms/<arm>/seed<seed>/: train.yaml,
train.log, checkpoints/, tensorboard/, hf/ and, once the run is complete, result.json (written
atomically: a crash loses at most the runs in progress; re-running skips finished runs and resumes an
interrupted training from its checkpoint). The runner starts ``jobs`` runs at once, each a process
(``python -m megatron_outeff.evaluation.experiment OUT_DIR ARM SEED``: it reads the experiment back
from OUT_DIR/experiment.json) that trains through the training CLI (``python -m
megatron_outeff.training.train``, one process) and evaluates the Hugging Face export (``convert.to_hf``):
  - curves: the training run's TensorBoard outlier probe (``training/outliers.py``) every
    outlier_interval steps on a fixed held-out micro-batch.
  - loss, loss_copy, loss_bigram: next-token NLL of the FP32 export on ``heldout_sequences``
    held-out sequences, split by the task's position classes.
  - ppl_fp32, ppl_w8a8_paper (simulated, per-tensor static, like-for-like op set), with ``deployable``
    ppl_fp16 and ppl_w8a8_deployable (compressed-tensors, Linear only): ``quant_eval``; with act_bits the
    dose-response ``quant_eval.activation_bit_sweep`` (b*, also with position 0 in float) and max|x| /
    RMS of every quantized activation (``quant_eval.quantized_activation_ranges``, largest named).
OUT_DIR/report.json, report.md and one plot per metric (all arms on one figure; with seeds, the mean
and a band from the lowest to the highest seed) at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.training.config import apply_override, config_from_dict, dataclass_from_dict
from megatron_outeff.utils.markdown import md_header, md_row
from megatron_outeff.utils.yaml_loader import load_yaml_file

__all__ = [
    "ARMS",
    "ExperimentConfig",
    "load_experiment",
    "run_experiment",
    "judge",
    "judge_rules",
    "read_curves",
    "curve_score",
    "CURVE_TAGS",
    "ExperimentFailed",
]

# Arm name -> attention variant (megatron_outeff.megatron.variant.AttentionVariantConfig fields): the
# list form of ``arms``.
ARMS = {
    "vanilla": {},
    "softmax1": {"softmax": "softmax1"},
    "learnable": {"softmax": "learnable"},
    "gated": {"gate": "linear"},
    "gated_softmax1": {"softmax": "softmax1", "gate": "linear"},
    "clipped": {"clip_alpha": 12.0},  # Bondarenko et al.'s OPT recipe: gamma = -12 / T, zeta = 1
    "clipped_softmax1": {"softmax": "softmax1", "clip_alpha": 12.0},
}
ARM_KEYS = ("attention", "optimizer")  # the training-config sections an arm may set

# Curve / final metric name -> TensorBoard tag written by the training run (training/outliers.py).
CURVE_TAGS = {
    "first_token_mass_idle": "outliers/max_head_first_token_mass_idle",  # max over layers x heads
    "first_token_mass_idle_mean": "outliers/mean_first_token_mass_idle",  # mean over layers x heads
    "first_token_mass": "outliers/mean_first_token_mass",
    "sink_mass": "outliers/mean_sink_mass",
    "sink_head_share": "outliers/sink_head_share_0.3",
    "bos_residual_norm_ratio": "outliers/max_first_token_norm_ratio",  # max over layers
    "value_norm_ratio": "outliers/min_value_norm_ratio",  # min over layers (head mean)
    "max_inf_norm": "outliers/max_inf_norm",
    "max_layer_inf_norm": "outliers/max_layer_inf_norm",
    "avg_kurtosis": "outliers/avg_kurtosis",
    "probe_loss_copy": "outliers/loss/copy",
    "probe_loss_bigram": "outliers/loss/bigram",
    "train_loss": "lm loss",
    # what a per-tensor quantizer sees (issue 21)
    "massive_activation": "outliers/max_massive_activation",  # MA, max over layers
    "range_inflation": "outliers/max_range_inflation",  # RI, max over layers
    "first_token_excess_norm": "outliers/first_token_excess_norm",  # E = max norm ratio - 1
    "max_absmax_over_rms": "outliers/max_absmax_over_rms",  # over the probe's components
}


@dataclasses.dataclass
class EvaluationConfig:
    """How each run's Hugging Face export is evaluated (every count >= 1)."""

    heldout_sequences: int = 128  # held-out Bigram-Backcopy sequences: loss, loss_copy, loss_bigram, perplexities
    calib_batches: int = 4  # W8A8 calibration batches (the paper: 4) ...
    calib_batch_size: int = 8  # ... of this many sequences (the paper: 8)
    batch_size: int = 16  # evaluation batch size
    act_bits: Optional[list] = None  # activation widths of the dose-response sweep, e.g. [8, 6, 5, 4]; null: none
    weight_bits: int = 8  # the sweep's weights
    sensitivity_tolerance: float = 0.05  # b*: the fewest activation bits with a perplexity increase below this
    deployable: bool = True  # also FP16 and the compressed-tensors W8A8 export (ppl_fp16, ppl_w8a8_deployable)


@dataclasses.dataclass
class ClaimConfig:
    """The pre-registered rule of the list form. Positive control: vanilla's final first_token_mass_idle >=
    control_min_idle_mass, its rise from the first probe >= control_min_rise (x), a plateau (the last
    plateau_points probes within plateau_rel_range of their mean), and bos_residual_norm_ratio >=
    control_min_norm_ratio and grown >= control_min_rise (x) from the first probe. Effect: an
    outlier-efficient arm whose first_token_mass_idle AND bos_residual_norm_ratio are each <= vanilla's
    / factor, with held-out loss within loss_tolerance (relative) of vanilla's."""

    factor: float = 5.0
    loss_tolerance: float = 0.02
    control_min_idle_mass: float = 0.3
    control_min_rise: float = 2.0
    control_min_norm_ratio: float = 2.0
    plateau_points: int = 3
    plateau_rel_range: float = 0.15


@dataclasses.dataclass
class ControlConfig:
    """Positive control: the baseline arm, every seed, scored at the same step (mean of the last
    tail_probes probes), must show the sink and the massive activation."""

    min_idle_mass: float = 0.3  # first_token_mass_idle (max head)
    min_first_token_excess_norm: float = 1.5  # E
    min_massive_activation: float = 3.0  # MA


@dataclasses.dataclass
class PipelineControl:
    """The sweep's own control: every run must lose at least min_increase (relative perplexity) at
    ``bits`` activation bits, or the sweep cannot tell sensitivities apart and no quantization claim
    is made."""

    bits: int = 4
    min_increase: float = 0.05


RULES = ("removes_massive_activation", "removes_channel_outliers", "lowers_quantization_sensitivity")


@dataclasses.dataclass
class Rule:
    """One pre-registered claim about ``arms`` against the baseline, judged per seed (seed k against the
    baseline's seed k); claimed only if every seed agrees, at the same step and (where it applies) at
    matched copy loss. The thresholds of each rule (``judge_rules``):

    removes_massive_activation: MA - 1 <= (baseline's MA - 1) / ma_excess_factor, RI <= max_range_inflation,
        MA's slope over the second half <= baseline's / slope_factor, held-out loss within
        loss_tolerance; at matched copy loss: the MA and RI conditions at that probe.
    removes_channel_outliers: every metric in outlier_metrics <= baseline's / outlier_factor (also at
        matched copy loss).
    lowers_quantization_sensitivity: b* <= baseline's b* - min_bits_lower, with and without position 0
        in float (else reported as token-wise only); needs the pipeline control."""

    rule: str
    arms: list
    ma_excess_factor: float = 3.0
    max_range_inflation: float = 1.2
    slope_factor: float = 3.0
    outlier_factor: float = 2.0
    outlier_metrics: list = dataclasses.field(default_factory=lambda: ["avg_kurtosis", "max_inf_norm"])
    min_bits_lower: int = 1


@dataclasses.dataclass
class RulesClaim:
    baseline: str
    rules: list
    control: ControlConfig = dataclasses.field(default_factory=ControlConfig)
    pipeline_control: PipelineControl = dataclasses.field(default_factory=PipelineControl)
    loss_tolerance: float = 0.02  # removes_massive_activation: held-out loss within this of the baseline's
    matched_copy_loss: Optional[float] = None  # the probe copy loss at which arms are also compared
    tail_probes: int = 3  # "final" value of a curve = the mean of its last tail_probes probes


@dataclasses.dataclass
class Run:
    arm: str
    seed: int
    dir: Path  # OUT_DIR-relative

    @property
    def label(self) -> str:
        return self.arm if self.dir.name == self.arm else f"{self.arm}/s{self.seed}"


@dataclasses.dataclass
class ExperimentConfig:
    name: str
    arms: dict  # arm -> overlay {attention: ..., optimizer: ...}
    seeds: list
    jobs: int
    time_limit_s: Optional[float]
    training: dict
    evaluation: EvaluationConfig
    claim: Any  # ClaimConfig (list form) or RulesClaim
    source: dict  # the YAML as loaded (with overrides): what the fingerprint covers
    legacy: bool = False  # the list form of arms with one seed: runs under arms/<arm>/, ClaimConfig

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.source, sort_keys=True).encode()).hexdigest()[:16]

    def runs(self) -> list[Run]:
        if self.legacy:
            return [Run(arm, self.seeds[0], Path("arms") / arm) for arm in self.arms]
        return [Run(arm, seed, Path("arms") / arm / f"seed{seed}") for arm in self.arms for seed in self.seeds]


def _merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OutEffError(f"{where}={value!r}: expected an integer >= 1")
    return value


def load_experiment(path, overrides: Optional[list] = None) -> ExperimentConfig:
    """Read and validate everything (arms, every arm's training config, the task, the claim rules)
    before anything is written."""
    data = load_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise OutEffError(f"{path}: expected a mapping")
    for item in overrides or []:
        apply_override(data, item)  # the training config's --set syntax
    return experiment_from_dict(data, default_name=Path(path).stem)


def experiment_from_dict(data: dict, default_name: str = "experiment") -> ExperimentConfig:
    known = ("name", "arms", "seeds", "jobs", "time_limit_s", "training", "evaluation", "claim")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise OutEffError(f"unknown experiment key '{unknown[0]}' (expected {', '.join(known)})")
    arms = data.get("arms")
    legacy = isinstance(arms, list)
    if legacy:
        if not arms:
            raise OutEffError(f"arms={arms!r}: expected a non-empty list of arm names from {sorted(ARMS)}")
        for a in arms:
            if a not in ARMS:
                raise OutEffError(f"unknown arm {a!r}: expected one of {sorted(ARMS)}")
        if len(set(arms)) != len(arms):
            raise OutEffError(f"arms={arms}: an arm is listed twice")
        if "vanilla" not in arms:
            raise OutEffError("arms: 'vanilla' (the positive control) must be one of the arms")
        arm_overlays = {a: {"attention": dict(ARMS[a])} for a in arms}
    elif isinstance(arms, dict) and arms:
        arm_overlays = {}
        for a, overlay in arms.items():
            overlay = overlay or {}
            if not isinstance(a, str) or not a.replace("_", "").replace("-", "").isalnum():
                raise OutEffError(f"arms: {a!r}: expected a name of letters, digits, '_' or '-'")
            if not isinstance(overlay, dict) or set(overlay) - set(ARM_KEYS):
                raise OutEffError(f"arms.{a}: expected a mapping with keys from {list(ARM_KEYS)}, got {overlay!r}")
            arm_overlays[a] = overlay
    else:
        raise OutEffError(
            f"arms={arms!r}: expected a mapping of arm name -> {{attention, optimizer}} or a list "
            f"of names from {sorted(ARMS)}"
        )
    training = data.get("training")
    if not isinstance(training, dict):
        raise OutEffError("training: expected a training config mapping (megatron_outeff.training.config)")
    if training.get("attention"):
        raise OutEffError("training.attention: set by each arm; leave it out of the shared training config")
    try:
        cfg = config_from_dict(training)
    except OutEffError as e:  # the training config's messages name its keys, not where it sits here
        raise with_context("training", e) from None
    if cfg.data.source != "bigram_backcopy":
        raise OutEffError(f"training.data.source={cfg.data.source!r}: the experiment needs bigram_backcopy")
    oi, ti = cfg.logging.outlier_interval, cfg.train.train_iters
    if oi < 1 or ti % oi:
        raise OutEffError(f"training.logging.outlier_interval={oi}: must be >= 1 and divide train.train_iters={ti}")
    if cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel != 1:
        raise OutEffError("training.parallel: the experiment runner trains each arm in one process (TP = PP = 1)")
    for a, overlay in arm_overlays.items():  # every arm's own training config, checked now
        try:
            config_from_dict(_merge(training, overlay))
        except OutEffError as e:
            raise with_context(f"arms.{a}", e) from None
    seeds = data.get("seeds", [cfg.train.seed])
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(x, bool) or not isinstance(x, int) for x in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise OutEffError(f"seeds={seeds!r}: expected a non-empty list of distinct integers")
    if legacy and len(seeds) > 1:
        raise OutEffError("seeds: several seeds need the mapping form of arms (arm: {attention, optimizer})")
    jobs = _positive_int(data.get("jobs", os.cpu_count() or 1), "jobs")
    limit = data.get("time_limit_s")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise OutEffError(f"time_limit_s={limit!r}: expected a number of seconds > 0 (or null)")
    ev = dataclass_from_dict(EvaluationConfig, data.get("evaluation") or {}, "evaluation")
    for k in ("heldout_sequences", "calib_batches", "calib_batch_size", "batch_size"):
        if getattr(ev, k) < 1:
            raise OutEffError(f"evaluation.{k}={getattr(ev, k)}: must be >= 1")
    from .quant_eval import check_bits

    check_bits(ev.weight_bits, "evaluation.weight_bits")
    if ev.act_bits is not None:
        if not ev.act_bits:
            raise OutEffError("evaluation.act_bits=[]: expected activation bit widths (or null: no sweep)")
        for b in ev.act_bits:
            check_bits(b, "evaluation.act_bits")
        if len(set(ev.act_bits)) != len(ev.act_bits):
            raise OutEffError(f"evaluation.act_bits={ev.act_bits}: a width is listed twice")
    if legacy:
        claim = dataclass_from_dict(ClaimConfig, data.get("claim") or {}, "claim")
    else:
        claim = _rules_claim(data.get("claim"), arm_overlays, ev)
    return ExperimentConfig(
        name=str(data.get("name", default_name)),
        arms=arm_overlays,
        seeds=list(seeds),
        jobs=jobs,
        time_limit_s=limit,
        training=training,
        evaluation=ev,
        claim=claim,
        source=data,
        legacy=legacy,
    )


def _rules_claim(data, arms: dict, ev: EvaluationConfig) -> RulesClaim:
    if not isinstance(data, dict) or "baseline" not in data or "rules" not in data:
        raise OutEffError(
            "claim: expected a mapping with baseline (an arm) and rules (a list) for the mapping form of arms"
        )
    claim = dataclass_from_dict(RulesClaim, data, "claim")
    if claim.baseline not in arms:
        raise OutEffError(f"claim.baseline={claim.baseline!r}: not an arm of this experiment (arms: {', '.join(arms)})")
    if not isinstance(claim.rules, list) or not claim.rules:
        raise OutEffError(f"claim.rules={claim.rules!r}: expected a non-empty list of rules")
    rules = []
    for i, r in enumerate(claim.rules):
        rule = dataclass_from_dict(Rule, r if isinstance(r, dict) else {"rule": r}, f"claim.rules[{i}]")
        if rule.rule not in RULES:
            raise OutEffError(f"claim.rules[{i}].rule={rule.rule!r}: expected one of {', '.join(RULES)}")
        if not isinstance(rule.arms, list) or not rule.arms:
            raise OutEffError(f"claim.rules[{i}].arms={rule.arms!r}: expected a non-empty list of arms")
        for a in rule.arms:
            if a not in arms:
                raise OutEffError(
                    f"claim.rules[{i}] ({rule.rule}) refers to arm {a!r}, which is not in this experiment "
                    f"(arms: {', '.join(arms)})"
                )
            if a == claim.baseline:
                raise OutEffError(f"claim.rules[{i}] ({rule.rule}): arm {a!r} is the baseline it is compared with")
        for m in rule.outlier_metrics:
            if m not in CURVE_TAGS:
                raise OutEffError(
                    f"claim.rules[{i}].outlier_metrics: {m!r} is not a probe metric ({', '.join(CURVE_TAGS)})"
                )
        if rule.rule == "lowers_quantization_sensitivity" and not ev.act_bits:
            raise OutEffError(
                f"claim.rules[{i}] (lowers_quantization_sensitivity) needs evaluation.act_bits (the sweep)"
            )
        rules.append(rule)
    claim.rules = rules
    if ev.act_bits and claim.pipeline_control.bits not in ev.act_bits:
        raise OutEffError(
            f"claim.pipeline_control.bits={claim.pipeline_control.bits}: not one of evaluation.act_bits {ev.act_bits}"
        )
    _positive_int(claim.tail_probes, "claim.tail_probes")
    return claim


# --------------------------------------------------------------------------------------------------
# Output directory
# --------------------------------------------------------------------------------------------------
MARKER = "experiment.json"


def claim_out_dir(out: Path, exp: ExperimentConfig) -> None:
    """OUT_DIR must be absent, empty, or hold THIS experiment (same fingerprint: continue)."""
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise OutEffError(f"--output-dir {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise OutEffError(f"--output-dir {out}: not empty and holds no experiment.json; refusing to overwrite")
        try:
            held = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OutEffError(f"--output-dir {out}: experiment.json is unreadable; refusing to overwrite") from None
        if held.get("fingerprint") != exp.fingerprint():
            raise OutEffError(
                f"--output-dir {out}: holds another experiment ({held.get('name')!r}, fingerprint "
                f"{held.get('fingerprint')}; this one is {exp.fingerprint()}); refusing to overwrite"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(marker, {"name": exp.name, "fingerprint": exp.fingerprint(), "config": exp.source})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o):
    """NaN/inf -> None (strict JSON); int keys (bit widths) stay as JSON turns them: strings."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------
def run_training_config(exp: ExperimentConfig, run: Run, run_dir: Path) -> dict:
    cfg = _merge(exp.training, exp.arms[run.arm])
    cfg.setdefault("train", {})["seed"] = run.seed
    cfg.setdefault("checkpoint", {})
    cfg["checkpoint"]["dir"] = str(run_dir / "checkpoints")
    cfg.setdefault("logging", {})
    cfg["logging"]["tensorboard_dir"] = str(run_dir / "tensorboard")
    return cfg


def read_curves(tensorboard_dir) -> dict[str, list]:
    """{metric: [[step, value], ...]} for CURVE_TAGS from a run's TensorBoard event files, plus
    ``absmax_over_rms_components`` ({component: [[step, value], ...]}, the probe's per-component tags) and
    ``first_token_norm_sources`` ({embedding | layer{i}.attn_out | layer{i}.fc2 | layer{i}.layer: ...}: where
    the first token's vector comes from)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))

    def points(tag):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run may log a step twice
        return [[s, by_step[s]] for s in sorted(by_step)]

    curves = {name: points(tag) for name, tag in CURVE_TAGS.items() if tag in have}
    for suffix, key in (
        ("/absmax_over_rms", "absmax_over_rms_components"),
        ("/first_token_norm", "first_token_norm_sources"),
    ):
        per = {
            t[len("outliers/") : -len(suffix)].replace("/", "."): points(t)
            for t in sorted(have)
            if t.startswith("outliers/") and t.endswith(suffix) and t != CURVE_TAGS["max_absmax_over_rms"]
        }
        if per:
            curves[key] = per
    return curves


def _train_run(exp: ExperimentConfig, run: Run, run_dir: Path, log) -> dict:
    """Run the training CLI for one run (resumes from its checkpoint). With ``time_limit_s`` the trainer
    gets SIGTERM that long after its first logged iteration (start-up, imports and engine building not
    counted; it finishes the step, saves, exits 0). Returns {"seconds", "time_limited"};
    ``train_done.json`` records a finished training, so a re-run does not train again."""
    done = run_dir / "train_done.json"
    if done.is_file():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(run_training_config(exp, run, run_dir), sort_keys=False))
    env = _child_env()
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    repo = str(Path(__file__).resolve().parents[2])
    cmd = [sys.executable, "-m", "megatron_outeff.training.train", "--config", str(cfg_path)]
    t0 = time.time()
    limited = threading.Event()
    with open(run_dir / "train.log", "a") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=repo)
        timer = None

        def stop():
            limited.set()
            proc.send_signal(signal.SIGTERM)

        try:
            for line in proc.stdout:
                if exp.time_limit_s and timer is None and line.startswith("iter "):
                    timer = threading.Timer(exp.time_limit_s, stop)
                    timer.start()
                logf.write(line)
                if (
                    line.startswith(("iter ", "resumed", "done", "error", "Traceback", "stop requested"))
                    or "Error" in line
                ):
                    log(f"[{run.label}] {line.rstrip()}")
            rc = proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
    if rc != 0:
        raise RuntimeError(f"run {run.label}: training exited with code {rc} (see {run_dir / 'train.log'})")
    result = {"seconds": round(time.time() - t0, 1), "time_limited": limited.is_set()}
    _write_json(done, result)
    return result


def _split_losses(model, blocks, task, batch_size: int) -> dict:
    """Held-out next-token NLL of an HF causal LM on blocks [n, s]: all, copy and bigram positions."""
    import torch

    from megatron_outeff.metrics.outliers import masked_mean

    dev = next(model.parameters()).device
    losses, copies = [], []
    with torch.no_grad():
        for i in range(0, blocks.shape[0], batch_size):
            ids = blocks[i : i + batch_size].to(dev)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            losses.append(nll.cpu())
            copies.append(task.copy_positions(blocks[i : i + batch_size])[:, :-1])
    nll, copy_mask = torch.cat(losses), torch.cat(copies)
    return {
        "loss": masked_mean(nll, torch.ones_like(copy_mask)),
        "loss_copy": masked_mean(nll, copy_mask),
        "loss_bigram": masked_mean(nll, ~copy_mask),
        "tokens": int(nll.numel()),
        "copy_tokens": int(copy_mask.sum()),
    }


def _evaluate_run(exp: ExperimentConfig, run: Run, run_dir: Path, log) -> dict:
    import torch

    from megatron_outeff.convert.core import to_hf
    from megatron_outeff.hf.perplexity import perplexity
    from megatron_outeff.training.config import bigram_backcopy_task

    from .quant_eval import (
        activation_bit_sweep,
        evaluate_quantization,
        load_hf_model,
        model_info,
        quantized_activation_ranges,
        simulated_w8a8_perplexity,
    )

    cfg = config_from_dict(run_training_config(exp, run, run_dir))
    task = bigram_backcopy_task(cfg)
    hf_dir = run_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        to_hf(run_dir / "checkpoints", hf_dir)
    dev = "cuda" if torch.cuda.is_available() else None
    model = load_hf_model(hf_dir, device=dev)
    ev = exp.evaluation
    blocks = task.blocks(cfg.data.bigram_backcopy.heldout_seed, ev.heldout_sequences)
    # Calibration: the first training sequences (the run's training stream, not the held-out one).
    calib = list(task.blocks(cfg.train.seed, ev.calib_batches * ev.calib_batch_size).split(ev.calib_batch_size))
    out = {"losses": _split_losses(model, blocks, task, ev.batch_size), "model": model_info(model)}
    say = lambda s: log(f"[{run.label}] {s}")  # noqa: E731
    if ev.deployable:
        say(f"evaluating FP32 / FP16 / W8A8 on {blocks.shape[0]} held-out sequences")
        out["perplexity"] = evaluate_quantization(hf_dir, blocks, calib, model=model, batch_size=ev.batch_size, log=say)
    else:
        say(f"evaluating FP32 / W8A8 (paper protocol) on {blocks.shape[0]} held-out sequences")
        out["perplexity"] = {
            "fp32": perplexity(model, blocks, batch_size=ev.batch_size),
            "w8a8_simulated": simulated_w8a8_perplexity(model, blocks, calib, batch_size=ev.batch_size),
        }
    if ev.act_bits:
        say(f"activation bit sweep {ev.act_bits} (W{ev.weight_bits}), also with position 0 in float")
        out["bit_sweep"] = activation_bit_sweep(
            model,
            blocks,
            calib,
            act_bits=ev.act_bits,
            weight_bits=ev.weight_bits,
            batch_size=ev.batch_size,
            tolerance=ev.sensitivity_tolerance,
            fp32_ppl=out["perplexity"]["fp32"]["ppl"],
            log=say,
        )
        out["activation_ranges"] = {
            "all": quantized_activation_ranges(model, blocks, batch_size=ev.batch_size),
            "first_token_float": quantized_activation_ranges(
                model, blocks, batch_size=ev.batch_size, exclude_first_token=True
            ),
        }
    return out


def _final(curves: dict, ev: dict) -> dict:
    final = {name: pts[-1][1] for name, pts in curves.items() if pts and isinstance(pts, list)}
    final.update({k: ev["losses"][k] for k in ("loss", "loss_copy", "loss_bigram")})
    ppl = ev["perplexity"]
    final["ppl_fp32"] = ppl["fp32"]["ppl"]
    final["ppl_w8a8_paper"] = ppl["w8a8_simulated"]["ppl"]
    final["quantized_activation_count"] = ppl["w8a8_simulated"]["quantized_activations"]
    final["quant_points"] = ppl["w8a8_simulated"]["quant_points"]
    if "fp16" in ppl:
        final["ppl_fp16"] = ppl["fp16"]["ppl"]
    if "w8a8_deployable" in ppl:
        final["ppl_w8a8_deployable"] = ppl["w8a8_deployable"]["ppl"]
        final["quantized_linear_count_deployable"] = ppl["w8a8_deployable"].get("quantized_linears")
    if "bit_sweep" in ev:
        sw = ev["bit_sweep"]
        final["b_star"] = sw["b_star"]["all"]
        final["b_star_first_token_float"] = sw["b_star"]["first_token_float"]
        for key, suffix in (("all", ""), ("first_token_float", "_first_token_float")):
            for bits, point in sw[key].items():
                final[f"ppl_increase_a{bits}{suffix}"] = point["increase"]
        for key, suffix in (("all", ""), ("first_token_float", "_first_token_float")):
            r = ev["activation_ranges"][key]
            final[f"max_absmax_over_rms_quantized{suffix}"] = r["max"]
            final[f"max_absmax_over_rms_quantized_tensor{suffix}"] = r["max_tensor"]
    comps = curves.get("absmax_over_rms_components")
    if comps:
        last = {name: pts[-1][1] for name, pts in comps.items() if pts}
        final["max_absmax_over_rms_component"] = max(last, key=last.get)
    return final


def run_one(exp: ExperimentConfig, run: Run, out: Path, log=print) -> dict:
    """Train and evaluate one run; writes and returns its result.json (skipped if it exists)."""
    run_dir = out / run.dir
    result_path = run_dir / "result.json"
    if result_path.is_file():
        log(f"[{run.label}] already complete ({result_path}); skipped")
        return json.loads(result_path.read_text())
    t0 = time.time()
    log(f"[{run.label}] training {exp.arms[run.arm] or 'vanilla softmax, adamw'} seed {run.seed} -> {run_dir}")
    train = _train_run(exp, run, run_dir, log)
    t1 = time.time()
    ev = _evaluate_run(exp, run, run_dir, log)
    curves = read_curves(run_dir / "tensorboard")
    overlay = exp.arms[run.arm]
    result = _clean(
        {
            "arm": run.arm,
            "seed": run.seed,
            "variant": overlay.get("attention", {}),
            "optimizer": overlay.get("optimizer", {}),
            "train_seconds": train["seconds"],
            "time_limited": train["time_limited"],
            "eval_seconds": round(time.time() - t1, 1),
            "wall_seconds": round(time.time() - t0, 1),
            "final": _final(curves, ev),
            "curve": curves,
            "evaluation": ev,
        }
    )
    _write_json(result_path, result)
    log(
        f"[{run.label}] done in {result['wall_seconds']:.0f} s: "
        + ", ".join(
            f"{k} {result['final'].get(k):.4g}"
            for k in (
                "loss",
                "first_token_mass_idle",
                "bos_residual_norm_ratio",
                "massive_activation",
                "ppl_fp32",
                "ppl_w8a8_paper",
                "b_star",
            )
            if isinstance(result["final"].get(k), (int, float))
        )
    )
    return result


# --------------------------------------------------------------------------------------------------
# Curves: the final score and the slope (issue 21)
# --------------------------------------------------------------------------------------------------
def curve_score(points: list, *, end_step: Optional[int] = None, tail: int = 3) -> dict:
    """A probe curve [[step, value], ...] cut at ``end_step`` (default: its last step), scored as
    ``last``: the mean of its last ``tail`` probes, and ``slope``: the least-squares slope of value
    over step across the second half (steps >= end_step / 2), per 1000 steps; ``at``: the last step
    used. None where the curve has no point (slope: fewer than 2 points in the second half)."""
    pts = [(s, v) for s, v in points if v is not None and (end_step is None or s <= end_step)]
    if not pts:
        return {"last": None, "slope": None, "at": None}
    end = end_step if end_step is not None else pts[-1][0]
    tail_vals = [v for _, v in pts[-tail:]]
    half = [(s, v) for s, v in pts if s >= end / 2]
    slope = None
    if len(half) >= 2:
        ms = sum(s for s, _ in half) / len(half)
        mv = sum(v for _, v in half) / len(half)
        sxx = sum((s - ms) ** 2 for s, _ in half)
        slope = 1000.0 * sum((s - ms) * (v - mv) for s, v in half) / sxx if sxx > 0 else None
    return {"last": sum(tail_vals) / len(tail_vals), "slope": slope, "at": pts[-1][0]}


def matched_step(points: list, target: float, end_step: Optional[int] = None) -> Optional[int]:
    """The first probe step whose probe copy loss is <= target (None: never reached by end_step)."""
    for s, v in points:
        if end_step is not None and s > end_step:
            break
        if v is not None and v <= target:
            return s
    return None


def _value_at(points: list, step: int):
    for s, v in points:
        if s == step:
            return v
    return None


# --------------------------------------------------------------------------------------------------
# The claim rule
# --------------------------------------------------------------------------------------------------
def _first_value(curves, name):
    pts = curves.get(name) or []
    return pts[0][1] if pts else None


def positive_control(vanilla: dict, c: ClaimConfig) -> dict:
    """Does the vanilla arm show the sink? (ClaimConfig doc.) Returns {passed, checks}."""
    f, curves = vanilla["final"], vanilla["curve"]
    idle = f.get("first_token_mass_idle")
    ratio = f.get("bos_residual_norm_ratio")
    idle0, ratio0 = _first_value(curves, "first_token_mass_idle"), _first_value(curves, "bos_residual_norm_ratio")
    tail = [v for _, v in (curves.get("first_token_mass_idle") or [])[-c.plateau_points :]]
    checks = {
        "idle_mass_reached": idle is not None and idle >= c.control_min_idle_mass,
        "idle_mass_rose": idle is not None and bool(idle0) and idle / idle0 >= c.control_min_rise,
        "idle_mass_plateau": len(tail) == c.plateau_points
        and (max(tail) - min(tail)) <= c.plateau_rel_range * (sum(tail) / len(tail)),
        "norm_ratio_reached": ratio is not None and ratio >= c.control_min_norm_ratio,
        "norm_ratio_grew": ratio is not None and bool(ratio0) and ratio / ratio0 >= c.control_min_rise,
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "values": {
            "idle_mass_first_probe": idle0,
            "idle_mass_final": idle,
            "idle_mass_tail": tail,
            "norm_ratio_first_probe": ratio0,
            "norm_ratio_final": ratio,
        },
    }


def judge(results: dict, c: ClaimConfig) -> dict:
    """The pre-registered claim rule over the finished arms' results ({arm: result})."""
    control = positive_control(results["vanilla"], c)
    v = results["vanilla"]["final"]
    arms = {}
    for name, r in results.items():
        if name == "vanilla":
            continue
        f = r["final"]
        idle_red = (
            v["first_token_mass_idle"] / f["first_token_mass_idle"] if f.get("first_token_mass_idle") else math.inf
        )
        ratio_red = (
            v["bos_residual_norm_ratio"] / f["bos_residual_norm_ratio"]
            if f.get("bos_residual_norm_ratio")
            else math.inf
        )
        loss_rel = (f["loss"] - v["loss"]) / v["loss"]
        arms[name] = {
            "idle_mass_reduction": idle_red,
            "norm_ratio_reduction": ratio_red,
            "loss_rel_diff": loss_rel,
            "removes_sink": idle_red >= c.factor and ratio_red >= c.factor,
            "equal_loss": abs(loss_rel) <= c.loss_tolerance,
        }
        arms[name]["effect"] = arms[name]["removes_sink"] and arms[name]["equal_loss"]
    effect_arms = [a for a, x in arms.items() if x["effect"]]
    return {
        "positive_control": control["passed"],
        "control": control,
        "arms": arms,
        "effect_claimed": control["passed"] and bool(effect_arms),
        "effect_arms": effect_arms if control["passed"] else [],
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
FINAL_ROWS = [
    ("held-out loss (all positions)", "loss", "{:.4f}"),
    ("held-out loss, copy positions", "loss_copy", "{:.4f}"),
    ("held-out loss, bigram positions", "loss_bigram", "{:.4f}"),
    ("first-token mass at idle positions (max head)", "first_token_mass_idle", "{:.4f}"),
    ("first-token mass at idle positions (mean head)", "first_token_mass_idle_mean", "{:.4f}"),
    ("first-token mass, all positions (mean)", "first_token_mass", "{:.4f}"),
    ("sink mass (mean)", "sink_mass", "{:.4f}"),
    ("share of heads with first-token mass > 0.3 (Sink^0.3)", "sink_head_share", "{:.3f}"),
    ("first-token residual-norm ratio (max layer)", "bos_residual_norm_ratio", "{:.3f}"),
    ("first-token value-norm ratio (min layer)", "value_norm_ratio", "{:.3f}"),
    ("max inf norm (all components)", "max_inf_norm", "{:.4g}"),
    ("max inf norm (residual stream)", "max_layer_inf_norm", "{:.4g}"),
    ("avg kurtosis", "avg_kurtosis", "{:.4g}"),
    ("ppl FP32", "ppl_fp32", "{:.4f}"),
    ("ppl W8A8 paper protocol (simulated, per-tensor static)", "ppl_w8a8_paper", "{:.4f}"),
    ("ppl W8A8 deployable (compressed-tensors, Linear only)", "ppl_w8a8_deployable", "{:.4f}"),
    ("quantized activation tensors (paper protocol)", "quantized_activation_count", "{}"),
]


def _report_header(exp: ExperimentConfig, *, wall_seconds: float, command: list) -> dict:
    """What every experiment report starts with: the experiment, the command, versions and the machine."""
    from .report import _versions

    return {
        "name": exp.name,
        "fingerprint": exp.fingerprint(),
        "command": command,
        "versions": _versions(),
        "wall_seconds": round(wall_seconds, 1),
        "cpu_count": os.cpu_count(),
    }


def build_report(exp: ExperimentConfig, results: dict, *, wall_seconds: float, command: list) -> dict:
    verdict = judge(results, exp.claim)
    return _clean(
        {
            **_report_header(exp, wall_seconds=wall_seconds, command=command),
            "positive_control": verdict["positive_control"],
            "effect_claimed": verdict["effect_claimed"],
            "verdict": verdict,
            "config": exp.source,
            "arms": {
                a: {k: r[k] for k in ("variant", "final", "curve", "train_seconds", "eval_seconds", "wall_seconds")}
                for a, r in results.items()
            },
        }
    )


def render_markdown(rep: dict) -> str:
    arms = list(rep["arms"])
    v = rep["verdict"]
    lines = [
        f"# Experiment {rep['name']}",
        "",
        f"Positive control (vanilla grows the sink): **{'passed' if rep['positive_control'] else 'FAILED'}**. "
        f"Effect claimed (pre-registered rule): **{'yes' if rep['effect_claimed'] else 'no'}**"
        + (f" ({', '.join(v['effect_arms'])})" if v["effect_arms"] else "")
        + ".",
        f"Wall time {rep['wall_seconds']:.0f} s on {rep['cpu_count']} CPU cores. Command: `{' '.join(rep['command'])}`",
        "",
        *md_header(["metric (final)", *arms]),
    ]
    for title, key, fmt in FINAL_ROWS:
        cells = []
        for a in arms:
            x = rep["arms"][a]["final"].get(key)
            cells.append("-" if x is None else fmt.format(x))
        lines.append(md_row([title, *cells]))
    lines += [
        "",
        "Against vanilla (reduction = vanilla / arm; effect needs both >= "
        f"{rep['config'].get('claim', {}).get('factor', ClaimConfig.factor)}x at |loss diff| <= "
        f"{rep['config'].get('claim', {}).get('loss_tolerance', ClaimConfig.loss_tolerance):.0%}):",
        "",
        # removes_sink (report.json): both reductions >= the factor, the sink *and* the first-token norm
        *md_header(
            [
                "arm",
                "idle-mass reduction",
                "norm-ratio reduction",
                "loss diff",
                f"both >= {rep['config'].get('claim', {}).get('factor', ClaimConfig.factor)}x",
                "equal loss",
                "effect",
            ]
        ),
    ]
    for a, x in v["arms"].items():
        row = [a, f"{x['idle_mass_reduction']:.2f}x", f"{x['norm_ratio_reduction']:.2f}x", f"{x['loss_rel_diff']:+.2%}"]
        lines.append(md_row([*row, x["removes_sink"], x["equal_loss"], x["effect"]]))
    c = v["control"]
    lines += [
        "",
        "Positive-control checks: "
        + ", ".join(f"{k} {'ok' if ok else 'FAIL'}" for k, ok in c["checks"].items())
        + f" (values: {json.dumps(c['values'])})",
        "",
        "Curves: " + ", ".join(f"`{n}.png`" for n in CURVE_TAGS) + " (all arms per figure, x = training step).",
        "",
    ]
    return "\n".join(lines)


def plot_curves(rep: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name in CURVE_TAGS:
        series = {a: r["curve"].get(name) for a, r in rep["arms"].items() if r["curve"].get(name)}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for a, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2.5, label=a)
        paths.append(_save_curve_figure(fig, ax, name, [p[1] for pts in series.values() for p in pts], out_dir))
    return paths


def _save_curve_figure(fig, ax, name: str, values: list, out_dir: Path) -> Path:
    """Log y when the positive values span > 50x; labels, legend; saved as OUT/<name>.png and closed."""
    import matplotlib.pyplot as plt

    pos = [v for v in values if v is not None and v > 0]
    if pos and max(pos) / max(min(pos), 1e-12) > 50:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_title(f"{name} ({CURVE_TAGS[name]})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# The rules of the mapping form (issue 21): arms x seeds
# --------------------------------------------------------------------------------------------------
SCORED = (
    "first_token_mass_idle",
    "sink_mass",
    "bos_residual_norm_ratio",
    "first_token_excess_norm",
    "massive_activation",
    "range_inflation",
    "max_absmax_over_rms",
    "max_inf_norm",
    "max_layer_inf_norm",
    "avg_kurtosis",
    "probe_loss_copy",
    "probe_loss_bigram",
)
EVALUATED = (
    "loss",
    "loss_copy",
    "loss_bigram",
    "ppl_fp32",
    "ppl_w8a8_paper",
    "b_star",
    "b_star_first_token_float",
    "max_absmax_over_rms_quantized",
    "max_absmax_over_rms_quantized_first_token_float",
)
B_STAR_NONE = 99  # b* of a run that fails even at the widest swept width: worse than any width


def _common_step(results: dict) -> int:
    """The last probe step every run reached (all of them at time-limited runs' different speeds)."""
    ends = [
        max(s for s, _ in r["curve"]["massive_activation"])
        for r in results.values()
        if r["curve"].get("massive_activation")
    ]
    return min(ends) if ends else 0


def run_scores(results: dict, claim: RulesClaim) -> dict:
    """Per run label: {"score": {metric: curve_score(...)} over the common step range, "matched_step",
    "matched": {metric: value at that probe}, "final": the evaluation's final values}."""
    end = _common_step(results)
    out = {}
    for key, r in results.items():
        curves = r["curve"]
        scores = {m: curve_score(curves[m], end_step=end, tail=claim.tail_probes) for m in SCORED if curves.get(m)}
        step = None
        if claim.matched_copy_loss is not None and curves.get("probe_loss_copy"):
            step = matched_step(curves["probe_loss_copy"], claim.matched_copy_loss, end)
        matched = {m: _value_at(curves[m], step) for m in SCORED if curves.get(m)} if step is not None else {}
        out[key] = {"score": scores, "matched_step": step, "matched": matched, "final": r["final"]}
    return {"common_step": end, "runs": out}


def _last(sc: dict, metric: str):
    return (sc["score"].get(metric) or {}).get("last")


def _slope(sc: dict, metric: str):
    return (sc["score"].get(metric) or {}).get("slope")


def _le(a, b) -> bool:
    return a is not None and b is not None and a <= b


def judge_rules(exp: ExperimentConfig, results: dict) -> dict:
    """The pre-registered rules (``Rule`` doc) over {(arm, seed): result}: positive control on the
    baseline (every seed), the sweep's pipeline control (every run), each rule per arm and seed (seed k
    against the baseline's seed k) at the same step (curves scored as the mean of their last probes
    over the common step range, slopes over its second half) and at matched copy loss; a rule is
    claimed for an arm only if the control passes and every seed agrees."""
    claim: RulesClaim = exp.claim
    scored = run_scores(results, claim)
    sc = scored["runs"]
    base = claim.baseline
    c = claim.control
    control = {}
    for seed in exp.seeds:
        s = sc[(base, seed)]
        values = {
            "first_token_mass_idle": _last(s, "first_token_mass_idle"),
            "first_token_excess_norm": _last(s, "first_token_excess_norm"),
            "massive_activation": _last(s, "massive_activation"),
        }
        checks = {
            "idle_mass": _le(c.min_idle_mass, values["first_token_mass_idle"]),
            "first_token_excess_norm": _le(c.min_first_token_excess_norm, values["first_token_excess_norm"]),
            "massive_activation": _le(c.min_massive_activation, values["massive_activation"]),
        }
        control[seed] = {"passed": all(checks.values()), "checks": checks, "values": values}
    control_ok = all(v["passed"] for v in control.values())
    pipeline = None
    if exp.evaluation.act_bits:
        pc = claim.pipeline_control
        runs = {f"{a}/s{s}": sc[(a, s)]["final"].get(f"ppl_increase_a{pc.bits}") for a, s in results}
        pipeline = {
            "passed": all(_le(pc.min_increase, v) for v in runs.values()),
            "bits": pc.bits,
            "min_increase": pc.min_increase,
            "increase": runs,
        }
    verdicts = []
    for rule in claim.rules:
        for arm in rule.arms:
            seeds = {seed: _judge_one(rule, claim, sc[(arm, seed)], sc[(base, seed)]) for seed in exp.seeds}
            verdicts.append(
                {
                    "rule": rule.rule,
                    "arm": arm,
                    "seeds": seeds,
                    **_claimed(rule, seeds, control_ok, pipeline, claim.matched_copy_loss is not None),
                }
            )
    return {
        "baseline": base,
        "common_step": scored["common_step"],
        "control": {"passed": control_ok, "seeds": control},
        "pipeline_control": pipeline,
        "rules": verdicts,
        "claims": [
            f"{v['rule']}: {v['arm']}" + ("" if v["claimed"] is True else f" ({v['claimed']})")
            for v in verdicts
            if v["claimed"]
        ],
        "scores": {f"{a}/s{s}": v for (a, s), v in sc.items()},
    }


def _judge_one(rule: Rule, claim: RulesClaim, arm: dict, base: dict) -> dict:
    """One seed's comparison: {"same_step": {"checks", "values"}, "matched": {...} or None}."""
    out = {}
    if rule.rule == "removes_massive_activation":
        ma, ma_v = _last(arm, "massive_activation"), _last(base, "massive_activation")
        ri = _last(arm, "range_inflation")
        sl, sl_v = _slope(arm, "massive_activation"), _slope(base, "massive_activation")
        loss, loss_v = arm["final"].get("loss"), base["final"].get("loss")
        loss_rel = (loss - loss_v) / loss_v if loss is not None and loss_v else None
        checks = {
            "ma_excess": ma is not None and ma_v is not None and ma - 1 <= (ma_v - 1) / rule.ma_excess_factor,
            "range_inflation": _le(ri, rule.max_range_inflation),
            "ma_slope": sl is not None and sl_v is not None and sl <= sl_v / rule.slope_factor,
            "equal_loss": loss_rel is not None and abs(loss_rel) <= claim.loss_tolerance,
        }
        out["same_step"] = {
            "checks": checks,
            "passed": all(checks.values()),
            "values": {
                "massive_activation": ma,
                "baseline_massive_activation": ma_v,
                "range_inflation": ri,
                "ma_slope": sl,
                "baseline_ma_slope": sl_v,
                "loss_rel_diff": loss_rel,
            },
        }
        out["matched"] = _matched(
            arm,
            base,
            lambda a, b: {
                "ma_excess": a.get("massive_activation") is not None
                and b.get("massive_activation") is not None
                and a["massive_activation"] - 1 <= (b["massive_activation"] - 1) / rule.ma_excess_factor,
                "range_inflation": _le(a.get("range_inflation"), rule.max_range_inflation),
            },
        )
    elif rule.rule == "removes_channel_outliers":
        checks, values = {}, {}
        for m in rule.outlier_metrics:
            a, b = _last(arm, m), _last(base, m)
            checks[m] = a is not None and b is not None and a <= b / rule.outlier_factor
            values[m], values[f"baseline_{m}"] = a, b
        out["same_step"] = {"checks": checks, "passed": all(checks.values()), "values": values}
        out["matched"] = _matched(
            arm,
            base,
            lambda a, b: {
                m: a.get(m) is not None and b.get(m) is not None and a[m] <= b[m] / rule.outlier_factor
                for m in rule.outlier_metrics
            },
        )
    else:  # lowers_quantization_sensitivity: the final models only
        values, checks = {}, {}
        for key in ("b_star", "b_star_first_token_float"):
            a, b = arm["final"].get(key), base["final"].get(key)
            a_, b_ = (B_STAR_NONE if a is None else a), (B_STAR_NONE if b is None else b)
            checks[key] = a_ <= b_ - rule.min_bits_lower and a is not None
            values[key], values[f"baseline_{key}"] = a, b
        out["same_step"] = {"checks": checks, "passed": all(checks.values()), "values": values}
        out["matched"] = None
    return out


def _matched(arm: dict, base: dict, checks_fn) -> dict:
    if arm["matched_step"] is None or base["matched_step"] is None:
        return {
            "passed": False,
            "checks": {},
            "reached": {"arm": arm["matched_step"], "baseline": base["matched_step"]},
            "note": "matched copy loss not reached",
        }
    checks = checks_fn(arm["matched"], base["matched"])
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "reached": {"arm": arm["matched_step"], "baseline": base["matched_step"]},
    }


def _claimed(rule: Rule, seeds: dict, control_ok: bool, pipeline, with_matched: bool) -> dict:
    same = all(v["same_step"]["passed"] for v in seeds.values())
    matched = (
        all(v["matched"]["passed"] for v in seeds.values())
        if with_matched and rule.rule != "lowers_quantization_sensitivity"
        else None
    )
    if rule.rule == "lowers_quantization_sensitivity":
        if pipeline is None or not pipeline["passed"]:
            return {
                "claimed": False,
                "same_step_all_seeds": same,
                "matched_all_seeds": None,
                "why": "pipeline control failed: the sweep cannot tell sensitivities apart",
            }
        token_wise = all(v["same_step"]["checks"]["b_star"] for v in seeds.values())
        claimed = True if same else ("token-wise only" if token_wise else False)
        return {
            "claimed": claimed if control_ok else False,
            "same_step_all_seeds": same,
            "matched_all_seeds": None,
            "why": None if control_ok else "positive control failed",
        }
    ok = same and (matched is not False)
    return {
        "claimed": ok and control_ok,
        "same_step_all_seeds": same,
        "matched_all_seeds": matched,
        "why": None if control_ok else "positive control failed",
    }


def summarize(exp: ExperimentConfig, results: dict, verdict: dict) -> dict:
    """Per arm, for every scored metric (same step: mean of the last probes; slope) and evaluated value:
    {"mean", "min", "max", "n"} over its seeds, and the same at matched copy loss."""
    sc = {(a, s): verdict["scores"][f"{a}/s{s}"] for a, s in results}
    out = {}
    for arm in exp.arms:
        rows = {}
        runs = [sc[(arm, seed)] for seed in exp.seeds]
        for m in SCORED:
            rows[m] = _stats([_last(r, m) for r in runs])
            rows[f"{m}_slope"] = _stats([_slope(r, m) for r in runs])
            rows[f"{m}_matched"] = _stats([r["matched"].get(m) for r in runs])
        for m in EVALUATED:
            rows[m] = _stats([r["final"].get(m) for r in runs])
        rows["matched_step"] = _stats([r["matched_step"] for r in runs])
        names = [r["final"].get("max_absmax_over_rms_quantized_tensor") for r in runs]
        rows["max_absmax_over_rms_quantized_tensor"] = sorted({n for n in names if n})
        sources = [results[(arm, seed)]["curve"].get("first_token_norm_sources") or {} for seed in exp.seeds]
        rows["first_token_norm_sources"] = {
            src: _stats(
                [
                    curve_score(per[src], end_step=verdict["common_step"], tail=exp.claim.tail_probes)["last"]
                    for per in sources
                    if per.get(src)
                ]
            )
            for src in sorted({k for per in sources for k in per})
        }
        out[arm] = rows
    return out


def _stats(values: list) -> dict:
    xs = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not xs:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


SUMMARY_ROWS = [
    ("held-out loss", "loss", "{:.4f}"),
    ("held-out loss, copy positions", "loss_copy", "{:.4f}"),
    ("first-token mass at idle positions (max head)", "first_token_mass_idle", "{:.3f}"),
    ("MA = max_c |h_0,c| / median |h| (max layer)", "massive_activation", "{:.3g}"),
    ("MA slope per 1k steps (second half)", "massive_activation_slope", "{:+.3g}"),
    ("RI = max |h_0| / max_(t>=1) |h_t| (max layer)", "range_inflation", "{:.3g}"),
    ("E = first-token norm ratio - 1 (max layer)", "first_token_excess_norm", "{:.3g}"),
    ("E slope per 1k steps", "first_token_excess_norm_slope", "{:+.3g}"),
    ("max |x| / RMS, probe components", "max_absmax_over_rms", "{:.3g}"),
    ("max |x| / RMS, quantized tensors (final model)", "max_absmax_over_rms_quantized", "{:.3g}"),
    ("... with position 0 excluded", "max_absmax_over_rms_quantized_first_token_float", "{:.3g}"),
    ("max inf norm (all components)", "max_inf_norm", "{:.3g}"),
    ("avg kurtosis", "avg_kurtosis", "{:.3g}"),
    ("ppl FP32", "ppl_fp32", "{:.4f}"),
    ("ppl W8A8 paper protocol", "ppl_w8a8_paper", "{:.4f}"),
    ("b* (fewest activation bits, < 5% ppl increase)", "b_star", "{:.0f}"),
    ("b* with position 0 in float", "b_star_first_token_float", "{:.0f}"),
]
MATCHED_ROWS = [
    ("probe step where copy loss first <= target", "matched_step", "{:.0f}"),
    ("MA", "massive_activation_matched", "{:.3g}"),
    ("RI", "range_inflation_matched", "{:.3g}"),
    ("E", "first_token_excess_norm_matched", "{:.3g}"),
    ("avg kurtosis", "avg_kurtosis_matched", "{:.3g}"),
    ("max inf norm", "max_inf_norm_matched", "{:.3g}"),
    ("first-token mass at idle positions", "first_token_mass_idle_matched", "{:.3f}"),
]


def _cell(st, fmt) -> str:
    if not st or st.get("mean") is None:
        return "-"
    if st["n"] == 1 or st["min"] == st["max"]:
        return fmt.format(st["mean"])
    return f"{fmt.format(st['mean'])} [{fmt.format(st['min'])}, {fmt.format(st['max'])}]"


def build_report_v2(exp: ExperimentConfig, results: dict, *, wall_seconds: float, command: list) -> dict:
    verdict = judge_rules(exp, results)
    return _clean(
        {
            **_report_header(exp, wall_seconds=wall_seconds, command=command),
            "seeds": exp.seeds,
            "positive_control": verdict["control"]["passed"],
            "pipeline_control": None if verdict["pipeline_control"] is None else verdict["pipeline_control"]["passed"],
            "claims": verdict["claims"],
            "verdict": verdict,
            "summary": summarize(exp, results, verdict),
            "config": exp.source,
            "runs": {
                f"{a}/s{s}": {
                    k: r[k]
                    for k in (
                        "arm",
                        "seed",
                        "final",
                        "curve",
                        "train_seconds",
                        "eval_seconds",
                        "wall_seconds",
                        "time_limited",
                    )
                }
                for (a, s), r in results.items()
            },
        }
    )


def render_markdown_v2(rep: dict) -> str:
    v = rep["verdict"]
    arms = list(rep["summary"])
    seeds = ", ".join(map(str, rep["seeds"]))
    pc = v["pipeline_control"]
    lines = [
        f"# Experiment {rep['name']}",
        "",
        f"Arms x seeds ({seeds}), compared at step {v['common_step']} (curves: mean of the last probes; "
        "slopes over the second half) and at matched copy loss. Cells: mean over seeds [lowest, highest].",
        "",
        f"Positive control on {v['baseline']} (every seed): **{'passed' if v['control']['passed'] else 'FAILED'}**. "
        + (
            "Pipeline control (every run loses >= "
            f"{pc['min_increase']:.0%} at {pc['bits']} activation bits): **{'passed' if pc['passed'] else 'FAILED'}**. "
            if pc
            else ""
        )
        + f"Claims (pre-registered rules, every seed agreeing): **{'; '.join(v['claims']) or 'none'}**.",
        f"Wall time {rep['wall_seconds']:.0f} s on {rep['cpu_count']} CPU cores. Command: `{' '.join(rep['command'])}`",
        "",
        *md_header(["metric", *arms]),
    ]
    for title, key, fmt in SUMMARY_ROWS:
        lines.append(md_row([title, *(_cell(rep["summary"][a].get(key), fmt) for a in arms)]))
    lines += [
        "",
        "At matched copy loss (each run at its first probe with copy loss <= the target):",
        "",
        *md_header(["metric", *arms]),
    ]
    for title, key, fmt in MATCHED_ROWS:
        lines.append(md_row([title, *(_cell(rep["summary"][a].get(key), fmt) for a in arms)]))
    srcs = sorted(
        {k for a in arms for k in rep["summary"][a].get("first_token_norm_sources", {})},
        key=lambda k: (k != "embedding", k),
    )
    if srcs:
        lines += [
            "",
            "Where the first token's vector comes from: ||x_0|| at each source (same step; attention / MLP "
            "outputs before their bias; `layer` = the residual stream after the layer):",
            "",
            *md_header(["source", *arms]),
        ]
        for src in srcs:
            cells = [_cell(rep["summary"][a].get("first_token_norm_sources", {}).get(src), "{:.3g}") for a in arms]
            lines.append(md_row([src, *cells]))
    lines += [
        "",
        *md_header(
            ["rule", "arm", "claimed", "same step, every seed", "matched copy loss, every seed", "per seed (same step)"]
        ),
    ]
    for r in v["rules"]:
        per_seed = "; ".join(
            f"s{s}: " + ", ".join(f"{k} {'ok' if ok else 'no'}" for k, ok in x["same_step"]["checks"].items())
            for s, x in r["seeds"].items()
        )
        claimed = f"{r['claimed']}" + (f" ({r['why']})" if r.get("why") else "")
        lines.append(md_row([r["rule"], r["arm"], claimed, r["same_step_all_seeds"], r["matched_all_seeds"], per_seed]))
    ctl = "; ".join(
        f"s{s}: "
        + ", ".join(
            f"{k} {x['values'][m]:.3g}" if x["values"][m] is not None else f"{k} -"
            for k, m in (
                ("idle mass", "first_token_mass_idle"),
                ("E", "first_token_excess_norm"),
                ("MA", "massive_activation"),
            )
        )
        for s, x in v["control"]["seeds"].items()
    )
    lines += ["", f"Positive control values: {ctl}."]
    if pc:
        lines.append(
            "Pipeline control, increase at A"
            + str(pc["bits"])
            + ": "
            + ", ".join(f"{k} {x:+.1%}" if x is not None else f"{k} -" for k, x in pc["increase"].items())
            + "."
        )
    lines += [
        "",
        "Curves: " + ", ".join(f"`{n}.png`" for n in CURVE_TAGS) + " (all arms per figure; line = mean over "
        "seeds, band = lowest to highest seed; x = training step).",
        "",
    ]
    return "\n".join(lines)


def plot_curves_v2(rep: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(rep["summary"])
    end = rep["verdict"]["common_step"]
    paths = []
    for name in CURVE_TAGS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn, vals = False, []
        for i, arm in enumerate(arms):
            curves = [r["curve"].get(name) for r in rep["runs"].values() if r["arm"] == arm and r["curve"].get(name)]
            if not curves:
                continue
            steps = sorted(
                {s for c in curves for s, _ in c if s <= end}
                if name != "train_loss"
                else {s for c in curves for s, _ in c}
            )
            by = [{s: v for s, v in c} for c in curves]
            rows = [(s, [b[s] for b in by if b.get(s) is not None]) for s in steps]
            rows = [(s, xs) for s, xs in rows if xs]
            if not rows:
                continue
            xs = [s for s, _ in rows]
            color = f"C{i % 10}"
            ax.plot(xs, [sum(x) / len(x) for _, x in rows], color=color, lw=1.2, label=f"{arm} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(xs, [min(x) for _, x in rows], [max(x) for _, x in rows], color=color, alpha=0.2, lw=0)
            vals += [v for _, x in rows for v in x]
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        paths.append(_save_curve_figure(fig, ax, name, vals, out_dir))
    return paths


# --------------------------------------------------------------------------------------------------
# The runner: runs at once, one process each
# --------------------------------------------------------------------------------------------------
class ExperimentFailed(RuntimeError):
    """Some runs failed (their logs say why); the finished ones are kept for the next invocation."""


def _child_env() -> dict:
    """The environment of a run's process: its own single-process group (no launcher variables
    inherited), one intra-op thread unless the caller set OMP_NUM_THREADS, this repository importable."""
    from megatron_outeff.megatron.parallel import single_process_env

    env = dict(single_process_env(), PYTHONUNBUFFERED="1")
    # One intra-op thread per training process unless the caller says otherwise: on a shared 2-core
    # machine OpenMP's spinning threads made a step 5-10x slower (measured, tools/results/experiments/).
    env.setdefault("OMP_NUM_THREADS", "1")
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_all(exp: ExperimentConfig, out: Path, runs: list, log, t0: float) -> list:
    """Start each pending run as its own process, at most exp.jobs at once; stream their lines. Returns
    the labels of failed runs."""
    lock = threading.Lock()
    failed = []
    legacy = exp.legacy

    def say(line):
        with lock:
            log(line)

    def pump(proc, run):
        for line in proc.stdout:
            say(line.rstrip())
        if proc.wait() != 0:
            failed.append(run.label)
            say(
                f"[{run.label}] FAILED (exit code {proc.returncode}; see {out / run.dir / 'train.log'} and the lines above)"
            )

    active: list = []
    for i, run in enumerate(runs):
        while len([t for t in active if t.is_alive()]) >= exp.jobs:
            time.sleep(0.2)
        what = (
            f"arm {i + 1}/{len(runs)}: {run.arm}" if legacy else f"run {i + 1}/{len(runs)}: {run.arm} seed {run.seed}"
        )
        say(f"==> {what} ({time.time() - t0:.0f} s elapsed)")
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_outeff.evaluation.experiment", str(out), run.arm, str(run.seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_child_env(),
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        t = threading.Thread(target=pump, args=(proc, run), daemon=True)
        t.start()
        active.append(t)
    for t in active:
        t.join()
    return failed


def run_experiment(exp: ExperimentConfig, out, *, command: list, log=print) -> dict:
    out = Path(out)
    claim_out_dir(out, exp)
    t0 = time.time()
    runs = exp.runs()
    pending = []
    for run in runs:
        if (out / run.dir / "result.json").is_file():
            log(f"[{run.label}] already complete ({out / run.dir / 'result.json'}); skipped")
        else:
            pending.append(run)
    failed = _run_all(exp, out, pending, log, t0) if pending else []
    invocations = out / "invocations.json"
    spent = json.loads(invocations.read_text()) if invocations.is_file() else []
    spent.append({"seconds": round(time.time() - t0, 1), "runs": [r.label for r in pending], "failed": failed})
    _write_json(invocations, spent)
    if failed:
        raise ExperimentFailed(
            f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); finished runs are "
            "kept: run the same command again to retry the others"
        )
    results = {(r.arm, r.seed): json.loads((out / r.dir / "result.json").read_text()) for r in runs}
    t_report = time.time()
    wall = sum(x["seconds"] for x in spent)
    if exp.legacy:
        rep = build_report(exp, {a: r for (a, _), r in results.items()}, wall_seconds=wall, command=command)
        plots = plot_curves(rep, out)
        md = render_markdown(rep)
        status = f"positive control {'passed' if rep['positive_control'] else 'FAILED'}, effect claimed: {rep['effect_claimed']}"
    else:
        rep = build_report_v2(exp, results, wall_seconds=wall, command=command)
        plots = plot_curves_v2(rep, out)
        md = render_markdown_v2(rep)
        status = (
            f"positive control {'passed' if rep['positive_control'] else 'FAILED'}, pipeline control "
            f"{rep['pipeline_control']}, claims: {'; '.join(rep['claims']) or 'none'}"
        )
    rep["wall_seconds"] = round(wall + time.time() - t_report, 1)
    rep["wall_seconds_this_invocation"] = round(time.time() - t0, 1)
    _write_json(out / "report.json", rep)
    (out / "report.md").write_text(md)
    log(f"==> report: {out / 'report.md'} ({len(plots)} plots); {status}")
    return rep


def _child_main(argv: list) -> int:
    """python -m megatron_outeff.evaluation.experiment OUT_DIR ARM SEED: one run of the experiment held
    in OUT_DIR/experiment.json (the runner's worker process)."""
    import torch

    out, arm, seed = Path(argv[0]), argv[1], int(argv[2])
    exp = experiment_from_dict(json.loads((out / MARKER).read_text())["config"])
    run = next(r for r in exp.runs() if r.arm == arm and r.seed == seed)
    # Evaluation with one intra-op thread too, unless OMP_NUM_THREADS says otherwise.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    run_one(exp, run, out, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
