"""All training configuration in one typed place.

A YAML file (configs/train/*.yaml) maps one-to-one onto the dataclasses below; ``--set a.b=c``
overrides are applied on top. Unknown keys are an error that names the key. Values derived from
several sections (gradient accumulation, the DeepSpeed JSON) are computed here, never written twice.

    cfg = load_config("configs/train/demo-tiny.yaml", ["train.train_iters=10", "parallel.zero_stage=2"])
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.ops.variants import AttentionVariantConfig
from megatron_outeff.utils.yaml_loader import load_yaml, load_yaml_file


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    arch: str = "tiny"  # "tiny" | "125m" | ... | path to an arch YAML (megatron_outeff.models.opt)
    # OPTArchConfig fields: the keys of a model YAML's arch: section, e.g. {vocab_size: 256, hidden_dropout: 0.0};
    # checked at load against OPTArchConfig's fields and types (training/model.py arch_config).
    arch_overrides: dict = field(default_factory=dict)
    vocab_size: Optional[int] = None  # embedding rows; None: the arch's vocabulary padded for TP
    # Further megatron TransformerConfig fields under megatron's names, e.g. {apply_query_key_layer_scaling: true};
    # checked at load against TransformerConfig's fields and types. A field another key owns (the
    # architecture's, precision, parallel, recompute, attention) is refused, naming that key.
    transformer_overrides: dict = field(default_factory=dict)
    # Activation recomputation, passed to megatron: null | "full" | "selective".
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None  # "uniform" | "block" (full recomputation only)
    recompute_num_layers: Optional[int] = None


# How the run is laid out over ranks, not what it computes: not part of the fingerprint (a run resumes
# on another layout; global_batch_size, which sets the trajectory, is).
LAYOUT_KEYS = ("tensor_parallel", "pipeline_parallel", "sequence_parallel", "zero_stage", "cpu_offload",
               "micro_batch_size")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 0  # 0..3 (ZeRO-2/3 cannot be combined with pipeline parallelism)
    cpu_offload: bool = False  # ZeRO optimizer state (and ZeRO-3 parameters) offloaded to CPU memory
    micro_batch_size: int = 1  # samples per micro-batch per data-parallel rank
    global_batch_size: int = 1  # samples per optimizer step, all data-parallel ranks together


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 4e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Weight decay by parameter role (training/optimizer.py decay_role): matrices and embeddings decayed;
    # biases and other 1-D parameters (softmax_offset) never, as in megatron-core; LayerNorm weights
    # only when true (megatron-core: false; the paper's OPT recipe: true).
    decay_norm_weights: bool = False


@dataclass
class ScheduleConfig:
    warmup_iters: int = 0
    decay_style: str = "linear"  # "linear" | "cosine" | "constant"
    decay_iters: Optional[int] = None  # None: train.train_iters
    min_lr: float = 0.0


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # "fp32" | "fp16" (dynamic loss scaling) | "bf16"
    initial_loss_scale_power: int = 16  # fp16: initial scale 2**power
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0


@dataclass
class TrainConfig:
    train_iters: int = 10
    clip_grad: float = 1.0  # 0 disables clipping
    eval_interval: int = 0  # 0 disables validation
    eval_iters: int = 1
    exit_interval: int = 0  # >0: save and stop after this many iterations (resume continues)
    seed: int = 1234


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: no checkpoints
    save_interval: int = 0  # 0: save only at the end
    keep_last: int = 2  # 0 keeps all
    # Start a NEW run from these weights (fresh optimizer, iteration 0), at any TP/PP: a model-only
    # checkpoint (tools/convert_checkpoint.py reshard / from-hf) or a training checkpoint dir. Ignored
    # when resuming this run's own checkpoint.
    init_from: Optional[str] = None


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None  # None: no TensorBoard
    log_interval: int = 1
    outlier_interval: int = 0  # 0: no outlier metrics


@dataclass
class BigramBackcopyConfig:
    """data.source=bigram_backcopy (megatron_outeff.data.bigram_backcopy; Guo et al. arXiv 2410.13835):
    BOS, a fixed random bigram chain, and after a trigger token a copy of the token before it.
    The training stream is seeded by train.seed, the held-out stream by heldout_seed."""

    vocab_size: int = 64  # BOS + triggers + regular tokens (<= the model's vocabulary)
    num_triggers: int = 3
    seed: int = 0  # the task itself (bigram matrix)
    heldout_seed: int = 999_983  # the fixed held-out (validation / probe) stream
    logit_scale: float = 2.0  # bigram rows: softmax(logit_scale * N(0, 1))


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic" | "indexed" | "bigram_backcopy"
    seq_length: int = 32
    # indexed (megatron_outeff.data): a list of .bin/.idx prefixes, or megatron's ["0.7", "a", "0.3", "b"].
    train_paths: list = field(default_factory=list)
    valid_paths: list = field(default_factory=list)
    tokenizer: Optional[str] = None  # sentencepiece .model / tokenizer.json / a directory holding one
    split: str = "969,30,1"  # train/valid/test document shares when valid_paths is empty
    cache_dir: Optional[str] = None  # megatron's index cache (shared by all ranks); default beside the data
    eod_mask_loss: bool = False  # no loss on predicting the end-of-document token
    bigram_backcopy: BigramBackcopyConfig = field(default_factory=BigramBackcopyConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    # Attention variant (its owner: megatron_outeff/ops/variants.py), e.g. {softmax: softmax1}; empty =
    # vanilla softmax. Parsed and validated by AttentionVariantConfig.from_dict when the config loads.
    attention: AttentionVariantConfig = field(default_factory=AttentionVariantConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Path to a DeepSpeed JSON merged over the generated one (only keys the typed config does not
    # own, e.g. bucket sizes or overlap_comm); a key contradicting the typed config is an error.
    deepspeed_overrides: Optional[str] = None

    # ---- derived values -------------------------------------------------------------------------
    def data_parallel_size(self, world_size: int) -> int:
        mp = self.parallel.tensor_parallel * self.parallel.pipeline_parallel
        if world_size % mp:
            raise OutEffError(
                f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = {mp}"
            )
        return world_size // mp

    def grad_accumulation_steps(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        p = self.parallel
        if p.global_batch_size % (p.micro_batch_size * dp):
            raise OutEffError(
                f"parallel.global_batch_size={p.global_batch_size} is not divisible by "
                f"micro_batch_size x data_parallel = {p.micro_batch_size} x {dp}"
            )
        return p.global_batch_size // (p.micro_batch_size * dp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that defines the run's trajectory (not where/how often it is saved
        or logged, nor when it stops early, nor its layout: ``LAYOUT_KEYS`` and the world size, which
        change only the floating-point reduction order; a run resumes on another layout, see
        training/elastic.py). A checkpoint dir holding another fingerprint is another run."""
        d = self.to_dict()
        for volatile in ("checkpoint", "logging"):
            d.pop(volatile)
        d["train"].pop("exit_interval")
        d["train"].pop("eval_interval")
        d["train"].pop("eval_iters")
        for key in LAYOUT_KEYS:
            d["parallel"].pop(key)
        blob = json.dumps(d, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    """Every key, checked when the config is loaded (before anything is built or written), without a
    process group: the sections here, the model and attention keys in model.check_model. World-size
    checks live in grad_accumulation_steps() and deepspeed_config()."""
    p, o, s, pr, t = cfg.parallel, cfg.optimizer, cfg.schedule, cfg.precision, cfg.train
    if p.zero_stage not in (0, 1, 2, 3):
        raise OutEffError(f"parallel.zero_stage={p.zero_stage}: expected 0, 1, 2 or 3")
    if p.pipeline_parallel > 1 and p.zero_stage > 1:
        raise OutEffError(
            f"parallel.zero_stage={p.zero_stage} with pipeline_parallel={p.pipeline_parallel}: "
            "ZeRO-2/3 partition gradients/parameters that pipeline stages need whole; use zero_stage 0 or 1"
        )
    if pr.dtype == "bf16" and p.zero_stage == 0 and p.tensor_parallel > 1:
        raise OutEffError(
            "precision.dtype=bf16 with zero_stage=0 and tensor_parallel > 1: DeepSpeed's bf16 ZeRO-0 optimizer "
            "miscounts TP-replicated parameters in the grad norm (wrong clipping); use zero_stage >= 1"
        )
    if p.sequence_parallel and p.tensor_parallel == 1:
        raise OutEffError("parallel.sequence_parallel needs tensor_parallel > 1")
    if p.cpu_offload and p.zero_stage == 0:
        raise OutEffError("parallel.cpu_offload needs zero_stage >= 1")
    for name in ("tensor_parallel", "pipeline_parallel", "micro_batch_size", "global_batch_size"):
        if getattr(p, name) < 1:
            raise OutEffError(f"parallel.{name}={getattr(p, name)}: must be >= 1")
    if p.global_batch_size % p.micro_batch_size:
        raise OutEffError(
            f"parallel.global_batch_size={p.global_batch_size} is not divisible by "
            f"micro_batch_size={p.micro_batch_size}"
        )
    if o.name.lower() != "adamw":
        raise OutEffError(f"optimizer.name={o.name!r}: only 'adamw' is supported")
    if len(o.betas) != 2:
        raise OutEffError(f"optimizer.betas={o.betas}: expected two numbers")
    if s.decay_style not in ("linear", "cosine", "constant"):
        raise OutEffError(f"schedule.decay_style={s.decay_style!r}: expected linear, cosine or constant")
    if pr.dtype not in ("fp32", "fp16", "bf16"):
        raise OutEffError(f"precision.dtype={pr.dtype!r}: expected fp32, fp16 or bf16")
    if cfg.model.recompute_granularity not in (None, "full", "selective"):
        raise OutEffError(
            f"model.recompute_granularity={cfg.model.recompute_granularity!r}: expected null, full or selective"
        )
    if t.train_iters < 1:
        raise OutEffError(f"train.train_iters={t.train_iters}: must be >= 1")
    if cfg.data.source not in ("synthetic", "indexed", "bigram_backcopy"):
        raise OutEffError(f"data.source={cfg.data.source!r}: expected synthetic, indexed or bigram_backcopy")
    if cfg.data.source == "bigram_backcopy":
        bigram_backcopy_task(cfg)  # impossible task parameters fail here
    if cfg.data.source == "indexed" and not cfg.data.train_paths:
        raise OutEffError("data.source=indexed needs data.train_paths")
    if cfg.model.recompute_method not in (None, "uniform", "block"):
        raise OutEffError(f"model.recompute_method={cfg.model.recompute_method!r}: expected null, uniform or block")
    for where, value, least in (
        ("schedule.warmup_iters", s.warmup_iters, 0), ("train.eval_interval", t.eval_interval, 0),
        ("train.eval_iters", t.eval_iters, 1), ("train.exit_interval", t.exit_interval, 0),
        ("checkpoint.save_interval", cfg.checkpoint.save_interval, 0), ("checkpoint.keep_last", cfg.checkpoint.keep_last, 0),
        ("logging.log_interval", cfg.logging.log_interval, 1), ("logging.outlier_interval", cfg.logging.outlier_interval, 0),
        ("data.seq_length", cfg.data.seq_length, 1),
    ):
        if value < least:
            raise OutEffError(f"{where}={value}: must be >= {least}")
    _read_deepspeed_overrides(cfg)
    from .model import check_model  # arch, overrides, attention variant, megatron TransformerConfig

    check_model(cfg)


def bigram_backcopy_task(cfg: Config):
    """The BigramBackcopyTask of data.bigram_backcopy and data.seq_length (OutEffError if impossible)."""
    from megatron_outeff.data.bigram_backcopy import BigramBackcopyTask

    b = cfg.data.bigram_backcopy
    try:
        return BigramBackcopyTask(vocab_size=b.vocab_size, num_triggers=b.num_triggers, seq_length=cfg.data.seq_length,
                                  seed=b.seed, logit_scale=b.logit_scale)
    except OutEffError as e:
        raise with_context("data.bigram_backcopy", e) from None


# --------------------------------------------------------------------------------------------------
# YAML <-> dataclasses
# --------------------------------------------------------------------------------------------------
def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML value to the dataclass field's type (bool, int, float, str, tuple, list, dict, a
    Literal's choices, an Enum's member names, Optional of one of them); other types are left to the
    dataclass's own checks."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where) if len(inner) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise OutEffError(f"{where}={value!r}: expected one of {', '.join(repr(a) for a in args)}")
        return value
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):  # by member name
        if isinstance(value, annotation):
            return value
        if value not in annotation.__members__:
            raise OutEffError(f"{where}={value!r}: expected one of {', '.join(annotation.__members__)}")
        return annotation[value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise OutEffError(f"{where}={value!r}: expected true or false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OutEffError(f"{where}={value!r}: expected an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OutEffError(f"{where}={value!r}: expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise OutEffError(f"{where}={value!r}: expected a string")
        return value
    if annotation is tuple:
        if not isinstance(value, (list, tuple)):
            raise OutEffError(f"{where}={value!r}: expected a list")
        return tuple(value)
    if annotation is list:
        if not isinstance(value, (list, tuple)):
            raise OutEffError(f"{where}={value!r}: expected a list")
        return list(value)
    if annotation is dict:
        if not isinstance(value, dict):
            raise OutEffError(f"{where}={value!r}: expected a mapping")
        return dict(value)
    return value


def typed_fields(cls, data: dict, where: str) -> dict:
    """The mapping ``data`` checked against the fields of dataclass ``cls``: an unknown key or a value of
    the wrong type raises OutEffError naming ``where.key``; values converted to the fields' types,
    nested dataclasses built. Only the keys given are returned (overrides of some fields)."""
    if not isinstance(data, dict):
        raise OutEffError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise OutEffError(f"unknown config key '{where + '.' if where else ''}{key}'")
    out = {}
    for name in names:
        if name not in data:
            continue
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if hasattr(hint, "from_dict"):  # a section whose owner parses it (the attention variant)
            try:
                out[name] = hint.from_dict(data[name])
            except ValueError as e:
                raise with_context(key, e) from None
        elif dataclasses.is_dataclass(hint):
            out[name] = dataclass_from_dict(hint, data[name] or {}, key)
        else:
            out[name] = _coerce(data[name], hint, key)
    return out


def dataclass_from_dict(cls, data: dict, where: str):
    """A typed config dataclass from a mapping: unknown keys and wrong types raise OutEffError naming `where`."""
    return cls(**typed_fields(cls, data, where))


def apply_override(data: dict, item: str) -> None:
    """Apply one `--set key.path=value` (YAML value) to a raw config mapping in place."""
    if "=" not in item:
        raise OutEffError(f"override {item!r}: expected key.path=value")
    path, raw = item.split("=", 1)
    keys = path.strip().split(".")
    value = load_yaml(raw, f"--set {path.strip()}") if raw.strip() else None
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise OutEffError(f"override {item!r}: {k} is not a section")
    node[keys[-1]] = value


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    data = json.loads(json.dumps(data or {}))  # deep copy
    for item in overrides or []:
        apply_override(data, item)
    cfg = dataclass_from_dict(Config, data, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data = {}
    if path is not None:
        data = load_yaml_file(path) or {}
    return config_from_dict(data, overrides)


def dump_config(cfg: Config) -> str:
    d = cfg.to_dict()
    d["optimizer"]["betas"] = list(d["optimizer"]["betas"])
    return yaml.safe_dump(d, sort_keys=False)


# --------------------------------------------------------------------------------------------------
# The DeepSpeed JSON, generated from the typed config
# --------------------------------------------------------------------------------------------------
def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config for this run. The optimizer and LR scheduler are client objects
    (built in optimizer.py), so no "optimizer"/"scheduler" sections (and no FusedAdam JIT build)."""
    p, pr = cfg.parallel, cfg.precision
    zero: dict = {"stage": p.zero_stage}
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(world_size),
        # DeepSpeed 0.19 clips at 1.0 unless told otherwise: always explicit.
        "gradient_clipping": float(cfg.train.clip_grad),
        "zero_optimization": zero,
        "fp16": {
            "enabled": pr.dtype == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": pr.initial_loss_scale_power,
            "loss_scale_window": pr.loss_scale_window,
            "hysteresis": pr.hysteresis,
            "min_loss_scale": pr.min_loss_scale,
        },
        "bf16": {"enabled": pr.dtype == "bf16"},
        "steps_per_print": 10**9,  # logging is ours
        "wall_clock_breakdown": False,
    }
    # DeepSpeed checks train_batch_size == micro x accumulation x its DP size: let it derive it.
    _merge_owned_checked(ds, _read_deepspeed_overrides(cfg), "")
    return ds


def _read_deepspeed_overrides(cfg: Config) -> dict:
    """The JSON of ``deepspeed_overrides`` ({} when unset); OutEffError if missing, unreadable or not a mapping."""
    if not cfg.deepspeed_overrides:
        return {}
    try:
        extra = json.loads(Path(cfg.deepspeed_overrides).read_text())
    except FileNotFoundError:
        raise OutEffError(f"deepspeed_overrides file not found: {cfg.deepspeed_overrides}") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise OutEffError(f"deepspeed_overrides={cfg.deepspeed_overrides}: not readable JSON ({e})") from None
    if not isinstance(extra, dict):
        raise OutEffError(f"deepspeed_overrides={cfg.deepspeed_overrides}: expected a JSON object")
    return extra


def _merge_owned_checked(base: dict, extra: dict, where: str) -> None:
    for key, value in extra.items():
        name = f"{where}{key}"
        if key in ("optimizer", "scheduler", "train_batch_size"):
            raise OutEffError(f"deepspeed_overrides: '{name}' is owned by the typed config (optimizer/schedule/parallel)")
        if key in base and isinstance(base[key], dict) and isinstance(value, dict):
            _merge_owned_checked(base[key], value, name + ".")
        elif key in base and base[key] != value:
            raise OutEffError(
                f"deepspeed_overrides: '{name}'={value!r} contradicts the typed config ({base[key]!r})"
            )
        else:
            base[key] = value
