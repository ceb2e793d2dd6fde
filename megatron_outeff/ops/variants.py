"""The attention variant: its one typed description, the softmax variants' math, and argument validation
shared by every attention implementation. Knows nothing of Megatron or Hugging Face.

All softmax variants are one formula with a per-head "sink" logit a_h added to the normaliser:

    p_i = exp(x_i) / (exp(a_h) + sum_j exp(x_j))

    vanilla    no sink (a_h = -inf)
    softmax1   a_h = 0            (Softmax_1, the OutEffHop layer)
    softmax_n  a_h = log(n)       (n >= 0 real; n = 0 is vanilla)
    learnable  a_h = offset[h]    (a parameter that receives a gradient; megatron-core's
                                   softmax_type='learnable', gpt-oss "sinks")

Equivalently: one extra key with logit a_h whose value vector is zero. It changes only the
normaliser, never the output direction (``resolve_sink`` turns a variant into a_h).

Optional clipping (Bondarenko et al. 2023) maps each probability through
clip((zeta - gamma) * p + gamma, 0, 1) with gamma <= 0 and zeta >= 1 (``Clip``).

Optional per-head gate (Bondarenko et al. 2023): ``megatron_outeff.ops.gate``.

``AttentionVariantConfig`` names one choice of all three. Its fields are the variant's names
everywhere: the training config's ``attention`` section, the checkpoint manifest's ``attention``,
the Hugging Face config.json (flat keys) and the converter's ``--variant``. The translation to and
from megatron-core's ``softmax_type`` is ``megatron_outeff.megatron.variant``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Optional, Tuple

import torch

SoftmaxType = Literal["vanilla", "softmax1", "softmax_n", "learnable"]
GateType = Literal["none", "linear", "mlp", "shared_linear"]
SOFTMAX_VARIANTS: Tuple[str, ...] = typing.get_args(SoftmaxType)
GATE_VARIANTS: Tuple[str, ...] = typing.get_args(GateType)
IMPLEMENTATIONS = ("auto", "torch", "cpu", "triton", "rowwise", "sdpa")

# Field names of files written before 2026-11-30, still read: checkpoint manifests said "n".
LEGACY_FIELD_NAMES = {"n": "softmax_n"}


def check_choice(name: str, value, choices: Tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a one-line ValueError naming it and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r}: unknown {name} variant {value!r}, expected one of {choices}")
    return value


def check_real(name: str, value, expected: str, ok: Callable[[float], bool] = lambda x: True) -> float:
    """``value`` as a finite float satisfying ``ok``, else a one-line ValueError saying ``expected``."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected a real number, {expected}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected a real number, {expected}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}={value!r}: expected a finite number, {expected}")
    if not ok(v):
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return v


def _softmax_n(value) -> float:
    return check_real("softmax_n", value, "n >= 0 (softmax_n adds n to the normaliser)", lambda x: x >= 0)


def _clip_gamma(value, name: str = "clip_gamma") -> float:
    return check_real(name, value, "gamma <= 0", lambda x: x <= 0)


def _clip_zeta(value, name: str = "clip_zeta") -> float:
    return check_real(name, value, "zeta >= 1", lambda x: x >= 1)


@dataclass(frozen=True)
class Clip:
    """Clipped softmax parameters: clip((zeta - gamma) * p + gamma, 0, 1)."""

    gamma: float
    zeta: float

    @staticmethod
    def parse(clip) -> Optional["Clip"]:
        """None, a ``Clip`` or a pair (gamma, zeta) -> a validated ``Clip`` (or None). ValueError otherwise."""
        if clip is None:
            return None
        if isinstance(clip, Clip):
            gamma, zeta = clip.gamma, clip.zeta
        else:
            try:
                gamma, zeta = clip
            except (TypeError, ValueError):
                raise ValueError(f"clip={clip!r}: expected None or a pair (gamma, zeta) of floats") from None
        return Clip(_clip_gamma(gamma, "clip gamma"), _clip_zeta(zeta, "clip zeta"))


@dataclass(frozen=True)
class AttentionVariantConfig:
    """An attention variant: softmax normaliser x optional clipping x optional per-head gate.

    softmax         vanilla | softmax1 | softmax_n | learnable (module docstring)
    softmax_n       the n of softmax_n (n >= 0; read only when softmax == "softmax_n")
    clip_gamma      clipped softmax lower stretch (<= 0); None (and no clip_alpha) = no clipping
    clip_zeta       clipped softmax upper stretch (>= 1)
    clip_alpha      the paper's OPT form instead of clip_gamma: gamma = -alpha / T, zeta = 1, T the
                    training sequence length (known only when a model is built: ``clip_pair(seq_length)``)
    gate            none | linear | mlp | shared_linear (``megatron_outeff.ops.gate``)
    gate_init_prob  every gate's value at initialisation, sigmoid(bias) (in (0, 1))

    Numbers are stored as floats. Errors: one-line ValueError naming the field, the bad value and
    what was expected.
    """

    softmax: SoftmaxType = "vanilla"
    softmax_n: float = 1.0
    clip_gamma: Optional[float] = None
    clip_zeta: float = 1.0
    clip_alpha: Optional[float] = None
    gate: GateType = "none"
    gate_init_prob: float = 0.25

    def __post_init__(self):
        check_choice("softmax", self.softmax, SOFTMAX_VARIANTS)
        check_choice("gate", self.gate, GATE_VARIANTS)
        if self.clip_gamma is not None and self.clip_alpha is not None:
            raise ValueError(
                f"clip_gamma={self.clip_gamma} and clip_alpha={self.clip_alpha}: give one of them, not both"
            )
        numbers = dict(
            softmax_n=_softmax_n(self.softmax_n),
            clip_gamma=None if self.clip_gamma is None else _clip_gamma(self.clip_gamma),
            clip_zeta=_clip_zeta(self.clip_zeta),
            clip_alpha=None if self.clip_alpha is None else check_real(
                "clip_alpha", self.clip_alpha, "alpha > 0 (gamma = -alpha / seq_length)", lambda x: x > 0),
            gate_init_prob=check_real("gate_init_prob", self.gate_init_prob, "a probability in (0, 1)",
                                      lambda x: 0.0 < x < 1.0),
        )
        if numbers["clip_alpha"] is not None and numbers["clip_zeta"] != 1.0:
            raise ValueError(f"clip_alpha with clip_zeta={self.clip_zeta}: the alpha form fixes zeta = 1")
        for name, value in numbers.items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "AttentionVariantConfig":
        """From a mapping of the fields (YAML, JSON, a manifest's ``attention``); None = the defaults.

        Unknown keys are an error. Also read: the legacy names of ``LEGACY_FIELD_NAMES``, and
        ``clip_zeta: null`` without a clip (Hugging Face configs exported before 2026-11-30).
        """
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"attention variant {d!r}: expected a mapping of {cls.field_names()}")
        names = cls.field_names()
        kwargs, given = {}, {}
        for key, value in d.items():
            name = LEGACY_FIELD_NAMES.get(key, key)
            if name not in names:
                raise ValueError(f"attention variant key {key!r}: unknown variant key, expected one of {names}")
            if name in kwargs:
                raise ValueError(f"attention variant keys {given[name]!r} and {key!r}: the same field twice")
            kwargs[name], given[name] = value, key
        if kwargs.get("clip_zeta", 1.0) is None and kwargs.get("clip_gamma") is None:
            del kwargs["clip_zeta"]
        return cls(**kwargs)

    @classmethod
    def from_fields(cls, mapping: Mapping[str, Any], *, pop: bool = False) -> "AttentionVariantConfig":
        """From the variant's keys among others (a Hugging Face config.json); ``pop`` removes them."""
        keys = [k for k in mapping if k in cls.field_names() or k in LEGACY_FIELD_NAMES]
        fields = {k: (mapping.pop(k) if pop else mapping[k]) for k in keys}
        return cls.from_dict(fields)

    @classmethod
    def parse(cls, value) -> "AttentionVariantConfig":
        """None (the defaults), a variant, a mapping of fields, a softmax name ("softmax1") or a JSON
        object of fields ('{"softmax": "learnable", "gate": "linear"}')."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                try:
                    value = json.loads(text)
                except ValueError as e:
                    raise ValueError(f"attention variant {value!r}: not a JSON object ({e})") from None
            else:
                value = {"softmax": text}
        return cls.from_dict(value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "AttentionVariantConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values
    @property
    def clipped(self) -> bool:
        return self.clip_gamma is not None or self.clip_alpha is not None

    @property
    def gated(self) -> bool:
        return self.gate != "none"

    @property
    def learnable_offset(self) -> bool:
        return self.softmax == "learnable"

    @property
    def plain_softmax(self) -> bool:
        """Plain softmax attention: vanilla (or softmax_n with n = 0), no clip, no gate."""
        vanilla = self.softmax == "vanilla" or (self.softmax == "softmax_n" and self.softmax_n == 0.0)
        return vanilla and not self.clipped and not self.gated

    def softmax_args(self) -> dict:
        """The softmax arguments of ``outeff_attention`` / ``resolve_sink`` for this variant (the
        learnable offset, a tensor, is the caller's)."""
        return {"softmax": self.softmax, "n": self.softmax_n}

    def clip_pair(self, seq_length: Optional[int] = None) -> Optional[Tuple[float, float]]:
        """(gamma, zeta) for ``megatron_outeff.ops.outeff_attention(clip=...)``, or None.

        The alpha form needs the training sequence length T: gamma = -alpha / T, zeta = 1.
        """
        if self.clip_gamma is not None:
            return (self.clip_gamma, self.clip_zeta)
        if self.clip_alpha is None:
            return None
        try:
            length = 0 if seq_length is None else int(seq_length)
        except (TypeError, ValueError):
            length = 0
        if length <= 0:
            raise ValueError(
                f"clip_alpha={self.clip_alpha} needs the training sequence length (gamma = -alpha / seq_length); got {seq_length!r}"
            )
        return (-self.clip_alpha / length, 1.0)

    def resolved(self, seq_length: Optional[int] = None) -> "AttentionVariantConfig":
        """The same variant with the alpha form turned into an explicit gamma for ``seq_length``."""
        if self.clip_alpha is None:
            return self
        gamma, zeta = self.clip_pair(seq_length)
        return dataclasses.replace(self, clip_alpha=None, clip_gamma=gamma, clip_zeta=zeta)

    def describe(self) -> str:
        """Short human-readable name, e.g. 'gated(linear) softmax1' or 'clipped(-0.03,1) vanilla'."""
        parts = []
        if self.gated:
            parts.append(f"gated({self.gate})")
        if self.clip_gamma is not None:
            parts.append(f"clipped({self.clip_gamma:g},{self.clip_zeta:g})")
        elif self.clip_alpha is not None:
            parts.append(f"clipped(alpha={self.clip_alpha:g})")
        parts.append(f"softmax_n(n={self.softmax_n:g})" if self.softmax == "softmax_n" else self.softmax)
        return " ".join(parts)


def resolve_sink(
    softmax: str,
    n: float,
    offset: Optional[torch.Tensor],
    num_heads: int,
    device: torch.device,
) -> Optional[torch.Tensor]:
    """The per-head sink logit a_h as an fp32 tensor [num_heads], or None for vanilla softmax.

    ``n``: the n of softmax_n. For ``learnable`` the returned tensor is ``offset`` promoted to at
    least fp32 (a differentiable cast, so gradients flow to ``offset``; an fp64 offset stays fp64
    for gradcheck).
    """
    check_choice("softmax", softmax, SOFTMAX_VARIANTS)
    if softmax == "learnable":
        if offset is None:
            raise ValueError("offset=None: softmax='learnable' needs an offset tensor of shape [heads]")
        if not isinstance(offset, torch.Tensor) or offset.shape != (num_heads,):
            shape = tuple(offset.shape) if isinstance(offset, torch.Tensor) else type(offset).__name__
            raise ValueError(f"offset shape {shape}: expected ({num_heads},), one value per query head")
        if offset.device != device:
            raise ValueError(f"offset on {offset.device}: expected the device of q ({device})")
        return offset.to(torch.promote_types(offset.dtype, torch.float32))
    if offset is not None:
        raise ValueError(f"offset given with softmax={softmax!r}: an offset is only used with softmax='learnable'")
    if softmax == "vanilla":
        return None
    if softmax == "softmax1":
        value = 0.0
    else:  # softmax_n
        n = _softmax_n(n)
        if n == 0:
            return None  # softmax_0 is vanilla softmax
        value = math.log(n)
    return torch.full((num_heads,), value, dtype=torch.float32, device=device)


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_rank4(name: str, t, layout: str) -> None:
    """One-line ValueError unless ``t`` is a float32 / float16 / bfloat16 / float64 tensor of rank 4
    (``layout`` names its dimensions in the message)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} has rank {t.dim()} (shape {tuple(t.shape)}): expected rank 4 {layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype {t.dtype}: expected float32, float16, bfloat16 (or float64)")


def _check_tensor(name, t, device, dtype_ok, dtype_expected: str, shape_ok, shape_expected: str) -> None:
    """One-line ValueErrors for a tensor argument of the wrong kind, dtype, shape or device (q's)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not dtype_ok(t):
        raise ValueError(f"{name} dtype {t.dtype}: expected {dtype_expected}")
    if not shape_ok(tuple(t.shape)):
        raise ValueError(f"{name} shape {tuple(t.shape)}: expected {shape_expected}")
    if t.device != device:
        raise ValueError(f"{name} on {t.device}: expected the device of q ({device})")


def validate_attention_args(q, k, v, gate, key_padding_mask, scale, dropout_p, impl, mask=None) -> Tuple[int, int, int, int, int, float]:
    """Check shapes/dtypes/devices of the attention inputs. Returns (b, sq, sk, h, h_kv, scale).

    mask: None or a bool tensor broadcastable to [b, h, sq, sk] (each dim its size or 1), True = masked out."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_rank4(name, t, "[batch, seq, heads, head_dim]")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}: expected one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"devices q={q.device}, k={k.device}, v={v.device}: expected one device")
    b, sq, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} and v shape {tuple(v.shape)}: expected equal shapes")
    bk, sk, h_kv, dk = k.shape
    if bk != b:
        raise ValueError(f"k batch {bk}: expected q's batch {b}")
    if dk != d:
        raise ValueError(f"k head_dim {dk}: expected q's head_dim {d}")
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"kv heads {h_kv}: expected a divisor of the {h} query heads")
    if gate is not None:
        _check_tensor("gate", gate, q.device, lambda t: t.is_floating_point(), "a floating dtype with values in (0, 1)",
                      lambda s: s == (b, sq, h), f"({b}, {sq}, {h}) = [batch, sq, heads]")
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, q.device, lambda t: t.dtype == torch.bool,
                      "torch.bool, True for real tokens", lambda s: s == (b, sk), f"({b}, {sk}) = [batch, sk]")
    if mask is not None:
        _check_tensor("mask", mask, q.device, lambda t: t.dtype == torch.bool, "torch.bool, True = masked out",
                      lambda s: len(s) == 4 and all(m in (1, n) for m, n in zip(s, (b, h, sq, sk))),
                      f"[b|1, h|1, sq|1, sk|1] = ({b}, {h}, {sq}, {sk}) or 1s")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale}: expected a finite positive number")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p={dropout_p}: expected 0 <= dropout_p < 1")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLEMENTATIONS}")
    return b, sq, sk, h, h_kv, scale
