"""The outlier experiment: train every attention variant ("arm") on Bigram-Backcopy with the same
seed, data order and step count through the real training stack, evaluate each, and report.

    python tools/run_experiment.py --config configs/experiments/bb-sink-cpu.yaml --output-dir OUT_DIR [--set k=v ...]

An experiment YAML (configs/experiments/*.yaml):
    name:       a label
    arms:       list of arm names from ARMS (each is an attention variant)
    training:   a complete training config (megatron_outeff.training.config), shared by all arms;
                data.source must be bigram_backcopy and logging.outlier_interval must divide
                train.train_iters (the last probe is the final measurement)
    evaluation: heldout_sequences, calib_batches, calib_batch_size, batch_size
    claim:      the pre-registered rule (see ``judge``)

Per arm, under OUT_DIR/arms/<arm>/: train.yaml, train.log, checkpoints/, tensorboard/, hf/ and,
once the arm is complete, result.json (written atomically: a crash loses at most the arm in
progress; re-running skips finished arms and resumes an interrupted training from its checkpoint).
Training runs as its own process (``python -m megatron_outeff.training.train``, one process, the same
CLI a user runs); evaluation here, on the Hugging Face export (``convert.to_hf``):
  - curves: the training run's TensorBoard outlier probe (``training/outliers.py``) every
    outlier_interval steps on a fixed held-out micro-batch; ``final`` = the last probe.
  - loss, loss_copy, loss_bigram: next-token NLL of the FP32 export on ``heldout_sequences``
    held-out sequences, split by the task's position classes.
  - ppl_fp32, ppl_w8a8_paper (simulated, per-tensor static, like-for-like op set), ppl_w8a8_deployable
    (compressed-tensors, Linear only): ``quant_eval.evaluate_quantization`` on the same sequences.
OUT_DIR/report.json, report.md and one plot per metric (all arms on one figure) at the end.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.training.config import apply_override, dataclass_from_dict, config_from_dict
from megatron_outeff.utils.yaml_loader import load_yaml_file

__all__ = ["ARMS", "ExperimentConfig", "load_experiment", "run_experiment", "judge",
           "read_curves", "CURVE_TAGS"]

# Arm name -> attention variant (megatron_outeff.megatron.variant.AttentionVariantConfig fields).
ARMS = {
    "vanilla": {},
    "softmax1": {"softmax": "softmax1"},
    "learnable": {"softmax": "learnable"},
    "gated": {"gate": "linear"},
    "gated_softmax1": {"softmax": "softmax1", "gate": "linear"},
    "clipped": {"clip_alpha": 12.0},  # Bondarenko et al.'s OPT recipe: gamma = -12 / T, zeta = 1
    "clipped_softmax1": {"softmax": "softmax1", "clip_alpha": 12.0},
}

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
}


@dataclasses.dataclass
class EvaluationConfig:
    """How each arm's Hugging Face export is evaluated (every count >= 1)."""

    heldout_sequences: int = 128  # held-out Bigram-Backcopy sequences: loss, loss_copy, loss_bigram, perplexities
    calib_batches: int = 4  # W8A8 calibration batches (the paper: 4) ...
    calib_batch_size: int = 8  # ... of this many sequences (the paper: 8)
    batch_size: int = 16  # evaluation batch size


@dataclasses.dataclass
class ClaimConfig:
    """The pre-registered rule. Positive control: vanilla's final first_token_mass_idle >=
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
class ExperimentConfig:
    name: str
    arms: list
    training: dict
    evaluation: EvaluationConfig
    claim: ClaimConfig
    source: dict  # the YAML as loaded (with overrides): what the fingerprint covers

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.source, sort_keys=True).encode()).hexdigest()[:16]


def load_experiment(path, overrides: Optional[list] = None) -> ExperimentConfig:
    """Read and validate everything (arms, the training config, the task) before anything is written."""
    data = load_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise OutEffError(f"{path}: expected a mapping")
    for item in overrides or []:
        apply_override(data, item)  # the training config's --set syntax
    unknown = sorted(set(data) - {"name", "arms", "training", "evaluation", "claim"})
    if unknown:
        raise OutEffError(f"unknown experiment key '{unknown[0]}' (expected name, arms, training, evaluation, claim)")
    arms = data.get("arms")
    if not isinstance(arms, list) or not arms:
        raise OutEffError(f"arms={arms!r}: expected a non-empty list of arm names from {sorted(ARMS)}")
    for a in arms:
        if a not in ARMS:
            raise OutEffError(f"unknown arm {a!r}: expected one of {sorted(ARMS)}")
    if len(set(arms)) != len(arms):
        raise OutEffError(f"arms={arms}: an arm is listed twice")
    if "vanilla" not in arms:
        raise OutEffError("arms: 'vanilla' (the positive control) must be one of the arms")
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
    ev = dataclass_from_dict(EvaluationConfig, data.get("evaluation") or {}, "evaluation")
    claim = dataclass_from_dict(ClaimConfig, data.get("claim") or {}, "claim")
    for k in ("heldout_sequences", "calib_batches", "calib_batch_size", "batch_size"):
        if getattr(ev, k) < 1:
            raise OutEffError(f"evaluation.{k}={getattr(ev, k)}: must be >= 1")
    return ExperimentConfig(name=str(data.get("name", Path(path).stem)), arms=list(arms), training=training,
                            evaluation=ev, claim=claim, source=data)


# --------------------------------------------------------------------------------------------------
# Output directory
# --------------------------------------------------------------------------------------------------
def claim_out_dir(out: Path, exp: ExperimentConfig) -> None:
    """OUT_DIR must be absent, empty, or hold THIS experiment (same fingerprint: continue)."""
    marker = out / "experiment.json"
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
            raise OutEffError(f"--output-dir {out}: holds another experiment ({held.get('name')!r}, fingerprint "
                                  f"{held.get('fingerprint')}; this one is {exp.fingerprint()}); refusing to overwrite")
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
    """NaN/inf -> None (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


# --------------------------------------------------------------------------------------------------
# One arm
# --------------------------------------------------------------------------------------------------
def arm_training_config(exp: ExperimentConfig, arm: str, arm_dir: Path) -> dict:
    cfg = copy.deepcopy(exp.training)
    cfg["attention"] = dict(ARMS[arm])
    cfg.setdefault("checkpoint", {})
    cfg["checkpoint"]["dir"] = str(arm_dir / "checkpoints")
    cfg.setdefault("logging", {})
    cfg["logging"]["tensorboard_dir"] = str(arm_dir / "tensorboard")
    return cfg


def read_curves(tensorboard_dir) -> dict[str, list]:
    """{metric: [[step, value], ...]} for CURVE_TAGS from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    curves = {}
    for name, tag in CURVE_TAGS.items():
        if tag in have:
            by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run may log a step twice
            curves[name] = [[s, by_step[s]] for s in sorted(by_step)]
    return curves


def _train_arm(exp: ExperimentConfig, arm: str, arm_dir: Path, log) -> float:
    """Run the training CLI for one arm (resumes from its checkpoint); returns wall seconds."""
    arm_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = arm_dir / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(arm_training_config(exp, arm, arm_dir), sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # One intra-op thread per training process unless the caller says otherwise: on a shared 2-core
    # machine OpenMP's spinning threads made a step 5-10x slower (measured, tools/results/experiments/).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "megatron_outeff.training.train", "--config", str(cfg_path)]
    t0 = time.time()
    with open(arm_dir / "train.log", "a") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=repo)
        for line in proc.stdout:
            logf.write(line)
            if line.startswith(("iter ", "resumed", "done", "error", "Traceback")) or "Error" in line:
                log(f"[{arm}] {line.rstrip()}")
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"arm {arm}: training exited with code {rc} (see {arm_dir / 'train.log'})")
    return time.time() - t0


def _split_losses(model, blocks, task, batch_size: int) -> dict:
    """Held-out next-token NLL of an HF causal LM on blocks [n, s]: all, copy and bigram positions."""
    import torch

    from megatron_outeff.metrics.outliers import masked_mean

    dev = next(model.parameters()).device
    losses, copies = [], []
    with torch.no_grad():
        for i in range(0, blocks.shape[0], batch_size):
            ids = blocks[i:i + batch_size].to(dev)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            losses.append(nll.cpu())
            copies.append(task.copy_positions(blocks[i:i + batch_size])[:, :-1])
    nll, copy_mask = torch.cat(losses), torch.cat(copies)
    return {"loss": masked_mean(nll, torch.ones_like(copy_mask)), "loss_copy": masked_mean(nll, copy_mask),
            "loss_bigram": masked_mean(nll, ~copy_mask), "tokens": int(nll.numel()),
            "copy_tokens": int(copy_mask.sum())}


def _evaluate_arm(exp: ExperimentConfig, arm: str, arm_dir: Path, log) -> dict:
    import torch

    from megatron_outeff.convert.core import to_hf
    from megatron_outeff.training.config import bigram_backcopy_task, config_from_dict

    from .quant_eval import evaluate_quantization, load_hf_model, model_info

    cfg = config_from_dict(arm_training_config(exp, arm, arm_dir))
    task = bigram_backcopy_task(cfg)
    hf_dir = arm_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        to_hf(arm_dir / "checkpoints", hf_dir)
    dev = "cuda" if torch.cuda.is_available() else None
    model = load_hf_model(hf_dir, device=dev)
    ev = exp.evaluation
    blocks = task.blocks(cfg.data.bigram_backcopy.heldout_seed, ev.heldout_sequences)
    # Calibration: the first training sequences (the training stream, not the held-out one).
    calib = list(task.blocks(cfg.train.seed, ev.calib_batches * ev.calib_batch_size).split(ev.calib_batch_size))
    out = _split_losses(model, blocks, task, ev.batch_size)
    log(f"[{arm}] evaluating FP32 / FP16 / W8A8 on {blocks.shape[0]} held-out sequences")
    ppl = evaluate_quantization(hf_dir, blocks, calib, model=model, batch_size=ev.batch_size, log=lambda s: log(f"[{arm}] {s}"))
    return {"losses": out, "perplexity": ppl, "model": model_info(model)}


def _final(curves: dict, ev: dict) -> dict:
    final = {name: pts[-1][1] for name, pts in curves.items() if pts}
    final.update({k: ev["losses"][k] for k in ("loss", "loss_copy", "loss_bigram")})
    ppl = ev["perplexity"]
    final["ppl_fp32"] = ppl["fp32"]["ppl"]
    final["ppl_fp16"] = ppl["fp16"]["ppl"]
    final["ppl_w8a8_paper"] = ppl["w8a8_simulated"]["ppl"]
    final["ppl_w8a8_deployable"] = ppl["w8a8_deployable"]["ppl"]
    final["quantized_activation_count"] = ppl["w8a8_simulated"]["quantized_activations"]
    final["quant_points"] = ppl["w8a8_simulated"]["quant_points"]
    final["quantized_linear_count_deployable"] = ppl["w8a8_deployable"].get("quantized_linears")
    return final


def run_arm(exp: ExperimentConfig, arm: str, out: Path, log) -> dict:
    arm_dir = out / "arms" / arm
    result_path = arm_dir / "result.json"
    if result_path.is_file():
        log(f"[{arm}] already complete ({result_path}); skipped")
        return json.loads(result_path.read_text())
    t0 = time.time()
    log(f"[{arm}] training {ARMS[arm] or 'vanilla softmax'} -> {arm_dir}")
    train_s = _train_arm(exp, arm, arm_dir, log)
    t1 = time.time()
    ev = _evaluate_arm(exp, arm, arm_dir, log)
    curves = read_curves(arm_dir / "tensorboard")
    result = _clean({"arm": arm, "variant": ARMS[arm], "train_seconds": round(train_s, 1),
                     "eval_seconds": round(time.time() - t1, 1), "wall_seconds": round(time.time() - t0, 1),
                     "final": _final(curves, ev), "curve": curves, "evaluation": ev})
    _write_json(result_path, result)
    log(f"[{arm}] done in {result['wall_seconds']:.0f} s: " + ", ".join(
        f"{k} {result['final'].get(k):.4g}" for k in ("loss", "first_token_mass_idle", "bos_residual_norm_ratio",
                                                       "ppl_fp32", "ppl_w8a8_paper") if result["final"].get(k) is not None))
    return result


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
    tail = [v for _, v in (curves.get("first_token_mass_idle") or [])[-c.plateau_points:]]
    checks = {
        "idle_mass_reached": idle is not None and idle >= c.control_min_idle_mass,
        "idle_mass_rose": idle is not None and bool(idle0) and idle / idle0 >= c.control_min_rise,
        "idle_mass_plateau": len(tail) == c.plateau_points and (max(tail) - min(tail)) <= c.plateau_rel_range * (sum(tail) / len(tail)),
        "norm_ratio_reached": ratio is not None and ratio >= c.control_min_norm_ratio,
        "norm_ratio_grew": ratio is not None and bool(ratio0) and ratio / ratio0 >= c.control_min_rise,
    }
    return {"passed": all(checks.values()), "checks": checks,
            "values": {"idle_mass_first_probe": idle0, "idle_mass_final": idle, "idle_mass_tail": tail,
                       "norm_ratio_first_probe": ratio0, "norm_ratio_final": ratio}}


def judge(results: dict, c: ClaimConfig) -> dict:
    """The pre-registered claim rule over the finished arms' results ({arm: result})."""
    control = positive_control(results["vanilla"], c)
    v = results["vanilla"]["final"]
    arms = {}
    for name, r in results.items():
        if name == "vanilla":
            continue
        f = r["final"]
        idle_red = v["first_token_mass_idle"] / f["first_token_mass_idle"] if f.get("first_token_mass_idle") else math.inf
        ratio_red = v["bos_residual_norm_ratio"] / f["bos_residual_norm_ratio"] if f.get("bos_residual_norm_ratio") else math.inf
        loss_rel = (f["loss"] - v["loss"]) / v["loss"]
        arms[name] = {"idle_mass_reduction": idle_red, "norm_ratio_reduction": ratio_red, "loss_rel_diff": loss_rel,
                      "removes_sink": idle_red >= c.factor and ratio_red >= c.factor,
                      "equal_loss": abs(loss_rel) <= c.loss_tolerance}
        arms[name]["effect"] = arms[name]["removes_sink"] and arms[name]["equal_loss"]
    effect_arms = [a for a, x in arms.items() if x["effect"]]
    return {"positive_control": control["passed"], "control": control, "arms": arms,
            "effect_claimed": control["passed"] and bool(effect_arms), "effect_arms": effect_arms if control["passed"] else []}


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


def build_report(exp: ExperimentConfig, results: dict, *, wall_seconds: float, command: list) -> dict:
    from .report import _versions

    verdict = judge(results, exp.claim)
    return _clean({
        "name": exp.name, "fingerprint": exp.fingerprint(), "command": command, "versions": _versions(),
        "wall_seconds": round(wall_seconds, 1), "cpu_count": os.cpu_count(),
        "positive_control": verdict["positive_control"], "effect_claimed": verdict["effect_claimed"],
        "verdict": verdict, "config": exp.source,
        "arms": {a: {k: r[k] for k in ("variant", "final", "curve", "train_seconds", "eval_seconds", "wall_seconds")}
                 for a, r in results.items()},
    })


def render_markdown(rep: dict) -> str:
    arms = list(rep["arms"])
    v = rep["verdict"]
    lines = [f"# Experiment {rep['name']}", "",
             f"Positive control (vanilla grows the sink): **{'passed' if rep['positive_control'] else 'FAILED'}**. "
             f"Effect claimed (pre-registered rule): **{'yes' if rep['effect_claimed'] else 'no'}**"
             + (f" ({', '.join(v['effect_arms'])})" if v["effect_arms"] else "") + ".",
             f"Wall time {rep['wall_seconds']:.0f} s on {rep['cpu_count']} CPU cores. Command: `{' '.join(rep['command'])}`", "",
             "| metric (final) | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for title, key, fmt in FINAL_ROWS:
        cells = []
        for a in arms:
            x = rep["arms"][a]["final"].get(key)
            cells.append("-" if x is None else fmt.format(x))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "Against vanilla (reduction = vanilla / arm; effect needs both >= "
              f"{rep['config'].get('claim', {}).get('factor', ClaimConfig.factor)}x at |loss diff| <= "
              f"{rep['config'].get('claim', {}).get('loss_tolerance', ClaimConfig.loss_tolerance):.0%}):", "",
              "| arm | idle-mass reduction | norm-ratio reduction | loss diff | removes sink | equal loss | effect |",
              "|---|---|---|---|---|---|---|"]
    for a, x in v["arms"].items():
        lines.append(f"| {a} | {x['idle_mass_reduction']:.2f}x | {x['norm_ratio_reduction']:.2f}x | {x['loss_rel_diff']:+.2%} | "
                     f"{x['removes_sink']} | {x['equal_loss']} | {x['effect']} |")
    c = v["control"]
    lines += ["", "Positive-control checks: " + ", ".join(f"{k} {'ok' if ok else 'FAIL'}" for k, ok in c["checks"].items())
              + f" (values: {json.dumps(c['values'])})", "",
              "Curves: " + ", ".join(f"`{n}.png`" for n in CURVE_TAGS) + " (all arms per figure, x = training step).", ""]
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
        vals = [p[1] for pts in series.values() for p in pts if p[1] is not None and p[1] > 0]
        if vals and max(vals) / max(min(vals), 1e-12) > 50:
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_title(f"{name} ({CURVE_TAGS[name]})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def run_experiment(exp: ExperimentConfig, out, *, command: list, log=print) -> dict:
    import torch

    out = Path(out)
    claim_out_dir(out, exp)
    # Evaluation here uses one intra-op thread too, unless OMP_NUM_THREADS says otherwise (_train_arm).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.time()
    results = {}
    for i, arm in enumerate(exp.arms):
        log(f"==> arm {i + 1}/{len(exp.arms)}: {arm} ({time.time() - t0:.0f} s elapsed)")
        results[arm] = run_arm(exp, arm, out, log)
    # Wall time: every arm's own time (also those finished by an earlier invocation) + this report.
    t_report = time.time()
    arm_seconds = sum(r["wall_seconds"] for r in results.values())
    rep = build_report(exp, results, wall_seconds=arm_seconds, command=command)
    plots = plot_curves(rep, out)
    rep["wall_seconds"] = round(arm_seconds + time.time() - t_report, 1)
    rep["wall_seconds_this_invocation"] = round(time.time() - t0, 1)
    _write_json(out / "report.json", rep)
    (out / "report.md").write_text(render_markdown(rep))
    log(f"==> report: {out / 'report.md'} ({len(plots)} plots); positive control "
        f"{'passed' if rep['positive_control'] else 'FAILED'}, effect claimed: {rep['effect_claimed']}")
    return rep

