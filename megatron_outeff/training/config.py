"""All training configuration in one typed place.

A YAML file (configs/train/*.yaml) maps one-to-one onto the dataclasses below; ``--set a.b=c``
overrides are applied on top. Unknown keys are an error that names the key. Values derived from
several sections (gradient accumulation, the DeepSpeed JSON) are computed here, never written twice.

    cfg = load_config("configs/train/demo-tiny.yaml", ["train.train_iters=10", "parallel.zero_stage=2"])
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import enum
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml

from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.ops.variants import AttentionVariantConfig
from megatron_outeff.utils.yaml_loader import load_yaml, load_yaml_file


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    # "tiny" | "125m" | ... (OPT) | "llama-tiny" | "llama-3-8b" | ... | path to an arch YAML (configs/model/;
    # the family, models/family.py, follows from the name's prefix or the YAML's family: key)
    arch: str = "tiny"
    # The family's ArchConfig fields (OPTArchConfig, LlamaArchConfig): the keys of a model YAML's arch: section,
    # e.g. {vocab_size: 256, hidden_dropout: 0.0}; checked at load against them (arch_config below).
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
LAYOUT_KEYS = (
    "tensor_parallel",
    "pipeline_parallel",
    "sequence_parallel",
    "zero_stage",
    "cpu_offload",
    "micro_batch_size",
)


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
    # training/optimizer.py build_optimizer; which layouts each supports: optimizer_layout_refusal.
    # adamw: torch AdamW (DeepSpeed's CPU AdamW under ZeRO-Offload). orthoadam: AdamW in a fixed random
    # orthogonal basis per parameter (training/orthoadam.py; Kaul et al. 2025). sgd: torch SGD with
    # momentum. muon: DeepSpeed's Muon (hidden matrices) with AdamW for the rest.
    type: Literal["adamw", "orthoadam", "sgd", "muon"] = "adamw"
    lr: float = 4e-4
    betas: tuple = (0.9, 0.95)  # adamw, orthoadam, muon's AdamW half
    eps: float = 1e-8  # adamw, orthoadam, muon's AdamW half
    weight_decay: float = 0.1
    # Weight decay by parameter role (training/optimizer.py decay_role): matrices and embeddings decayed;
    # biases and other 1-D parameters (softmax_offset) never, as in megatron-core; LayerNorm weights
    # only when true (megatron-core: false; the paper's OPT recipe: true). Every type keeps the roles
    # (sgd: torch SGD's L2 form; the others decoupled, in the original basis).
    decay_norm_weights: bool = False
    momentum: Optional[float] = None  # sgd (null: 0.9) and muon's Muon half (null: 0.95, DeepSpeed's default)
    nesterov: bool = False  # sgd
    rotation_seed: int = 0  # orthoadam: the rotations derive from it and each parameter's global name
    rotation_block_size: int = 1024  # orthoadam: a longer axis gets a block-diagonal rotation (memory)
    muon_lr: Optional[float] = None  # muon: peak lr of the Muon half (null: lr); the AdamW half uses lr


# Optimizer keys added with optimizer.type and their defaults: a config that leaves them so hashes as
# before (Config.fingerprint), so checkpoints written earlier stay this run's.
_OPTIMIZER_KEYS_SINCE_TYPE = {
    "momentum": None,
    "nesterov": False,
    "rotation_seed": 0,
    "rotation_block_size": 1024,
    "muon_lr": None,
}


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
    # fp16: stop (training/step.py SkippedSteps) after this many optimizer steps in a row skipped by the
    # loss scaler (0: never). A healthy start skips a few while the scale falls; 10 stops before
    # DeepSpeed's own min-scale exception at the defaults (2**16 falls to 1 after 17 skips).
    max_skipped_steps: int = 10


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
            raise OutEffError(f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = {mp}")
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
        training/elastic.py). A checkpoint dir holding another fingerprint is another run.
        Places are not hashed (checkpoint, logging, data.cache_dir) and files are hashed by what they
        are, not how they are written (``_identity``): a moved cache or another spelling of a data path
        is the same run."""
        d = self.to_dict()
        for volatile in ("checkpoint", "logging"):
            d.pop(volatile)
        d["train"].pop("exit_interval")
        d["train"].pop("eval_interval")
        d["train"].pop("eval_iters")
        d["precision"].pop("max_skipped_steps")  # when a diverged run stops, not what it computes
        for key in LAYOUT_KEYS:
            d["parallel"].pop(key)
        _identity(d)
        o = d["optimizer"]
        if o["type"] == "adamw" and all(o[k] == v for k, v in _OPTIMIZER_KEYS_SINCE_TYPE.items()):
            d["optimizer"] = {
                "name": "adamw",
                **{k: v for k, v in o.items() if k != "type" and k not in _OPTIMIZER_KEYS_SINCE_TYPE},
            }
        blob = json.dumps(d, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _identity(d: dict) -> None:
    """In the fingerprint's copy of the config ``d``: the index cache is a place (its key stays, as null,
    so configs without one keep their fingerprint); data prefixes are their resolved paths (symlinks,
    ``./``, ``..`` and relative spellings resolved; megatron's blend weights kept); the tokenizer, an
    arch YAML and the DeepSpeed overrides are their content (sha256), wherever they lie."""
    data = d["data"]
    data["cache_dir"] = None
    for key in ("train_paths", "valid_paths"):
        data[key] = [p if _is_number(p) else str(Path(str(p)).resolve()) for p in data[key]]
    if data["tokenizer"]:
        from megatron_outeff.data.tokenizer import tokenizer_file

        data["tokenizer"] = _content_hash(tokenizer_file(data["tokenizer"]))
    if Path(d["model"]["arch"]).is_file():
        d["model"]["arch"] = _content_hash(d["model"]["arch"])
    if d["deepspeed_overrides"]:
        d["deepspeed_overrides"] = _content_hash(d["deepspeed_overrides"])


def _is_number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _content_hash(path) -> str:
    """``sha256:<hex>`` of a file's bytes; a path that is not a file stays its resolved path (the
    config's own checks name it)."""
    p = Path(path)
    if not p.is_file():
        return str(p.resolve())
    return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def optimizer_layout_refusal(cfg: Config) -> str | None:
    """Why ``optimizer.type`` cannot run this config's layout (one line), or None. Checked by
    validate, before anything is built. (Resume on another layout: elastic.check_resume.)"""
    o, p, dtype = cfg.optimizer, cfg.parallel, cfg.precision.dtype
    kind = f"optimizer.type={o.type}"
    if o.type == "adamw":
        return None
    if p.cpu_offload:
        return (
            f"{kind} with parallel.cpu_offload: ZeRO-Offload steps only DeepSpeed's own CPU optimizers "
            "(DeepSpeedCPUAdam for adamw); use cpu_offload: false"
        )
    if o.type == "orthoadam" and (p.zero_stage > 0 or dtype != "fp32"):
        what = f"parallel.zero_stage={p.zero_stage}" if p.zero_stage > 0 else f"precision.dtype={dtype}"
        return (
            f"{kind} with {what}: DeepSpeed's ZeRO-1/2/3 and bf16/fp16 optimizers hand the base optimizer flat "
            "fp32 partitions that cut across parameters, and a per-axis rotation needs each parameter whole; "
            "expected zero_stage 0 with precision.dtype fp32 (DP, TP and PP are supported)"
        )
    if o.type == "muon":
        if p.tensor_parallel > 1:
            return (
                f"{kind} with parallel.tensor_parallel={p.tensor_parallel}: DeepSpeed's Muon orthogonalizes each "
                "rank's local shard (a block-wise Muon, a different optimizer than at TP=1), and megatron-core's "
                "TP-exact TensorParallelMuon needs the emerging_optimizers package and megatron's own optimizer "
                "wrappers instead of the DeepSpeed engine; expected tensor_parallel 1"
            )
        if dtype != "fp32":
            return (
                f"{kind} with precision.dtype={dtype}: verified in fp32 only (DeepSpeed's bf16 Muon needs fp32 "
                "gradient accumulation and dense DP); expected precision.dtype fp32"
            )
    return None


def validate(cfg: Config) -> None:
    """Every key, checked when the config is loaded (before anything is built or written), without a
    process group: the sections here, the model and attention keys in check_model. World-size
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
    if len(o.betas) != 2:
        raise OutEffError(f"optimizer.betas={o.betas}: expected two numbers")
    if o.momentum is not None and not 0.0 <= o.momentum < 1.0:
        raise OutEffError(f"optimizer.momentum={o.momentum}: expected a number in [0, 1)")
    if o.nesterov and o.type == "sgd" and o.momentum == 0:
        raise OutEffError("optimizer.nesterov=true needs optimizer.momentum > 0")
    if o.rotation_block_size < 1:
        raise OutEffError(f"optimizer.rotation_block_size={o.rotation_block_size}: must be >= 1")
    for where, value in (("optimizer.lr", o.lr), ("optimizer.muon_lr", o.muon_lr)):
        if value is not None and not value > 0:
            raise OutEffError(f"{where}={value}: must be > 0")
    reason = optimizer_layout_refusal(cfg)  # what each optimizer type can run
    if reason:
        raise OutEffError(reason)
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
    if cfg.data.source == "indexed":
        _check_validation_split(cfg)
    if cfg.model.recompute_method not in (None, "uniform", "block"):
        raise OutEffError(f"model.recompute_method={cfg.model.recompute_method!r}: expected null, uniform or block")
    for where, value, least in (
        ("schedule.warmup_iters", s.warmup_iters, 0),
        ("train.eval_interval", t.eval_interval, 0),
        ("train.eval_iters", t.eval_iters, 1),
        ("train.exit_interval", t.exit_interval, 0),
        ("checkpoint.save_interval", cfg.checkpoint.save_interval, 0),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last, 0),
        ("logging.log_interval", cfg.logging.log_interval, 1),
        ("logging.outlier_interval", cfg.logging.outlier_interval, 0),
        ("data.seq_length", cfg.data.seq_length, 1),
        ("precision.max_skipped_steps", pr.max_skipped_steps, 0),
    ):
        if value < least:
            raise OutEffError(f"{where}={value}: must be >= {least}")
    _read_deepspeed_overrides(cfg)
    check_model(cfg)  # arch, overrides, attention variant, megatron TransformerConfig


def _check_validation_split(cfg: Config) -> None:
    """data.split well-formed; validation (train.eval_interval) and the outlier probe
    (logging.outlier_interval) need a validation split: one without a share and no data.valid_paths
    would turn them off silently."""
    from megatron_outeff.data.datasets import split_shares

    d = cfg.data
    shares = split_shares(d.split, "data.split")
    wanted = [
        f"{key}={value}"
        for key, value in (
            ("train.eval_interval", cfg.train.eval_interval),
            ("logging.outlier_interval", cfg.logging.outlier_interval),
        )
        if value > 0
    ]
    if wanted and not d.valid_paths and shares[1] == 0:
        raise OutEffError(
            f"{' and '.join(wanted)} need validation data, but data.split={d.split!r} gives the validation "
            "split no share and data.valid_paths is empty; give it a share (e.g. data.split=969,30,1), "
            f"set data.valid_paths, or set {' and '.join(w.split('=')[0] for w in wanted)} to 0"
        )


def bigram_backcopy_task(cfg: Config):
    """The BigramBackcopyTask of data.bigram_backcopy and data.seq_length (OutEffError if impossible)."""
    from megatron_outeff.data.bigram_backcopy import BigramBackcopyTask

    b = cfg.data.bigram_backcopy
    try:
        return BigramBackcopyTask(
            vocab_size=b.vocab_size,
            num_triggers=b.num_triggers,
            seq_length=cfg.data.seq_length,
            seed=b.seed,
            logit_scale=b.logit_scale,
        )
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
        # our client optimizers other than AdamW are not on DeepSpeed's ZeRO list (they run: training README)
        **({"zero_allow_untested_optimizer": True} if p.zero_stage > 0 and cfg.optimizer.type != "adamw" else {}),
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
            raise OutEffError(
                f"deepspeed_overrides: '{name}' is owned by the typed config (optimizer/schedule/parallel)"
            )
        if key in base and isinstance(base[key], dict) and isinstance(value, dict):
            _merge_owned_checked(base[key], value, name + ".")
        elif key in base and base[key] != value:
            raise OutEffError(f"deepspeed_overrides: '{name}'={value!r} contradicts the typed config ({base[key]!r})")
        else:
            base[key] = value


# --------------------------------------------------------------------------------------------------
# The model section: architecture, attention variant, megatron's TransformerConfig (checked at load;
# training/model.py builds the model from them)
# --------------------------------------------------------------------------------------------------
# TransformerConfig fields the training config sets through its own keys (model.transformer_overrides
# refuses them, naming the key).
TRANSFORMER_FIELDS_OWNED = {
    "fp16": "precision.dtype",
    "bf16": "precision.dtype",
    "params_dtype": "precision.dtype",
    "pipeline_dtype": "precision.dtype",
    "sequence_parallel": "parallel.sequence_parallel",
    "tensor_model_parallel_size": "parallel.tensor_parallel",
    "pipeline_model_parallel_size": "parallel.pipeline_parallel",
    "recompute_granularity": "model.recompute_granularity",
    "recompute_method": "model.recompute_method",
    "recompute_num_layers": "model.recompute_num_layers",
    "softmax_type": "attention",
}
# TransformerConfig fields refused with a reason naming the supported way: each changes the parameter set, which
# layers a pipeline stage holds, or the function the checkpoint's weights compute, in a way the checkpoint format,
# the converter, resharding, resume on another layout and the Hugging Face export do not handle (megatron README
# "Overrides"). The model family adds its own (models.opt / models.llama TRANSFORMER_FIELDS_UNSUPPORTED).
_PIPELINE_SPLIT = (
    "moves layers between pipeline stages, while the checkpoint format (model files, resharding, "
    "resume on another layout) gives every stage num_layers / parallel.pipeline_parallel layers and "
    "has no virtual stages: use parallel.pipeline_parallel"
)
TRANSFORMER_FIELDS_REFUSED = {
    "attention_output_gate": "adds the elementwise output gate's rows to linear_qkv outside the attention variant, "
    "so the converter, export and resume would not know them: use attention.gate: elementwise "
    "(the same parameterization, converted, resharded, resumed and exported)",
    "softmax_scale": "changes the attention's scale, which neither the checkpoint's manifest nor the Hugging Face "
    "export records (both compute 1/sqrt(head_dim)), so a converted model would compute another "
    "function: not supported",
    **{
        key: _PIPELINE_SPLIT
        for key in (
            "num_layers_in_first_pipeline_stage",
            "num_layers_in_last_pipeline_stage",
            "pipeline_model_parallel_layout",
            "account_for_embedding_in_pipeline_split",
            "account_for_loss_in_pipeline_split",
            "virtual_pipeline_model_parallel_size",
        )
    },
}


def arch_config(cfg: Config):
    """The architecture config (its family's ArchConfig: OPTArchConfig, LlamaArchConfig; models/family.py) of
    model.arch with model.arch_overrides applied (checked against that class's fields and types: the keys of
    a model YAML's arch: section)."""
    from megatron_outeff.models.family import family_for_arch

    try:
        family = family_for_arch(cfg.model.arch)
        arch = family.arch.load_arch_config(cfg.model.arch)
    except (OutEffError, OSError) as e:
        raise with_context(f"model.arch={cfg.model.arch!r}", e) from None
    overrides = typed_fields(family.arch.ArchConfig, cfg.model.arch_overrides, "model.arch_overrides")
    try:
        arch = dataclasses.replace(arch, **overrides)
    except OutEffError as e:  # the ArchConfig's value checks name the arch, not the config key
        raise with_context("model.arch_overrides", e) from None
    if cfg.data.seq_length > arch.max_position_embeddings:
        raise OutEffError(
            f"data.seq_length={cfg.data.seq_length} exceeds max_position_embeddings={arch.max_position_embeddings}"
        )
    return arch


def attention_variant(cfg: Config):
    """cfg.attention: the typed AttentionVariantConfig (parsed and validated when the config loaded)."""
    return cfg.attention


def check_model(cfg: Config) -> None:
    """Every model-defining key checked when the config is loaded, before anything is built or written:
    model.arch and model.arch_overrides (the family's ArchConfig fields), the attention variant (with
    data.seq_length for the clip_alpha form), the TP/PP layout, model.vocab_size, and megatron's
    TransformerConfig built from the arch and model.transformer_overrides (its own field names and
    checks). Builds no module. Raises OutEffError naming the bad key."""

    from megatron_outeff.models.family import family_of

    arch = arch_config(cfg)
    family = family_of(arch)
    variant = attention_variant(cfg)  # raises its own "attention: ..." OutEffError
    try:
        variant.clip_pair(cfg.data.seq_length)
    except ValueError as e:
        raise OutEffError(f"attention: {e}") from None
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    try:
        family.arch.check_parallel_layout(arch, tp, pp)
    except OutEffError as e:
        raise with_context("model", e) from None
    vocab = cfg.model.vocab_size
    if vocab is not None and (vocab < arch.vocab_size or vocab % tp):
        raise OutEffError(
            f"model.vocab_size={vocab}: expected >= the arch's {arch.vocab_size} and divisible by tensor_parallel={tp}"
        )
    overrides = transformer_overrides(cfg)  # our own checks: complete one-line errors, passed on unchanged
    try:
        family.arch.transformer_config(arch, variant, **overrides)
    except (TypeError, ValueError, AssertionError) as e:
        raise with_context("model.transformer_overrides: megatron's TransformerConfig refuses them", e) from None


def check_transformer_overrides(overrides: dict, family=None) -> dict:
    """model.transformer_overrides checked against megatron's TransformerConfig: its field names, the types a
    YAML value can have (bool, int, float, str, Literal choices, Enum member names; a Python object such as
    a callable or a torch.dtype cannot come from YAML), no field another key owns, and none that makes a
    model the checkpoint format, converter or export cannot handle (``TRANSFORMER_FIELDS_REFUSED``, the
    family's ``TRANSFORMER_FIELDS_UNSUPPORTED``; one line with the supported way). Returns the converted mapping.
    ``family``: model.arch's (models/family.py; default OPT), whose architecture owns some fields."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_outeff.models.family import DEFAULT_FAMILY, get_family

    family = family or get_family(DEFAULT_FAMILY)
    from_arch, unsupported = family.arch.TRANSFORMER_FIELDS_FROM_ARCH, family.arch.TRANSFORMER_FIELDS_UNSUPPORTED
    where = "model.transformer_overrides"
    for key in overrides:
        if key in TRANSFORMER_FIELDS_OWNED:
            raise OutEffError(f"{where}.{key}: set by {TRANSFORMER_FIELDS_OWNED[key]}, not here")
        reason = TRANSFORMER_FIELDS_REFUSED.get(key) or unsupported.get(key)
        if reason:
            raise OutEffError(f"{where}.{key}: {reason}")
        if key in from_arch:
            arch_key = from_arch[key]
            raise OutEffError(
                f"{where}.{key}: "
                + (
                    f"set by the architecture: use model.arch_overrides.{arch_key}"
                    if arch_key
                    else f"fixed by the {family.label} architecture"
                )
            )
    checked = typed_fields(TransformerConfig, overrides, where)
    hints = typing.get_type_hints(TransformerConfig)
    for key, value in checked.items():
        if _python_object(hints[key]):
            raise OutEffError(
                f"{where}.{key}={value!r}: megatron expects a Python object ({hints[key]}), "
                "which a config value cannot be"
            )
    return checked


def _python_object(hint) -> bool:
    """A TransformerConfig field type that no YAML value has (a callable, a torch.dtype, a context manager)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return all(
        a is torch.dtype
        or typing.get_origin(a) in (collections.abc.Callable, contextlib.AbstractContextManager)
        or a in (collections.abc.Callable, typing.Callable)
        for a in args
    )


def transformer_overrides(cfg: Config) -> dict:
    """TransformerConfig fields set by the training config (on top of the arch's): model.transformer_overrides
    (checked, converted) and what precision and model.recompute_* ask for."""
    from megatron_outeff.models.family import family_for_arch

    over = check_transformer_overrides(cfg.model.transformer_overrides, family_for_arch(cfg.model.arch))
    # Identical initial weights for every TP layout: TP shards are exact slices of the full matrices.
    over.setdefault("use_cpu_initialization", True)
    over["fp16"] = cfg.precision.dtype == "fp16"
    over["bf16"] = cfg.precision.dtype == "bf16"
    if cfg.precision.dtype != "fp32":
        over["pipeline_dtype"] = torch.float16 if cfg.precision.dtype == "fp16" else torch.bfloat16
    if cfg.model.recompute_granularity:
        over["recompute_granularity"] = cfg.model.recompute_granularity
        if cfg.model.recompute_granularity == "full":
            over["recompute_method"] = cfg.model.recompute_method or "uniform"
            over["recompute_num_layers"] = cfg.model.recompute_num_layers or 1
    return over
