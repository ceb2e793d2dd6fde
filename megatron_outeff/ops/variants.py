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

Optional output gate, one of two families (papers, math and how they map: ``megatron_outeff.ops.gate``):
per head (Bondarenko et al. 2023: ``linear``, ``mlp``, ``shared_linear``) or per head and channel
(``elementwise``: Qiu et al. 2025, megatron-core's ``attention_output_gate``, Qwen3-Next's gate).

``AttentionVariantConfig`` names one choice of all three. Its fields are the variant's names
everywhere: the training config's ``attention`` section, the checkpoint manifest's ``attention``,
the Hugging Face config.json (flat keys) and the converter's ``--variant``. The translation to and
from megatron-core's ``softmax_type`` / ``attention_output_gate`` is ``megatron_outeff.megatron.variant``.

``variant_tensors`` is the one description of every tensor a variant adds to an attention layer
(name, shape, initial value, megatron and Hugging Face names, tensor-parallel split, weight decay):
megatron's layer, the Hugging Face remote code, the converter, the checkpoint format and the
optimizer's parameter roles iterate it instead of naming tensors.
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
GateType = Literal["none", "linear", "mlp", "shared_linear", "elementwise"]
SOFTMAX_VARIANTS: Tuple[str, ...] = typing.get_args(SoftmaxType)
GATE_VARIANTS: Tuple[str, ...] = typing.get_args(GateType)
IMPLEMENTATIONS = ("auto", "torch", "cpu", "triton", "rowwise", "sdpa")

# The per-head sink logit a_h of each softmax variant (module docstring): a constant (None: no sink, plain
# softmax), a function of the variant's n, or "offset": the learnable per-head tensor. Every softmax name
# has an entry (tests/megatron/test_variant_vocabulary.py); ``resolve_sink`` reads it.
SINK_LOGITS: Mapping[str, Any] = {
    "vanilla": None,
    "softmax1": 0.0,
    "softmax_n": lambda n: None if n == 0 else math.log(n),  # softmax_0 is vanilla softmax
    "learnable": "offset",
}
# The family of each gate kind (``megatron_outeff.ops.gate``): None (no gate), "head" (one value per head,
# ``gate.head_gate`` of the layer input) or "elementwise" (one value per head and channel, from rows fused
# into the QKV projection). Every gate name has an entry; megatron's layer and the Hugging Face remote code
# build a gate by its family.
GATE_FAMILIES: Mapping[str, Optional[str]] = {
    "none": None,
    "linear": "head",
    "mlp": "head",
    "shared_linear": "head",
    "elementwise": "elementwise",
}

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
    gate            none | linear | mlp | shared_linear (per head) | elementwise (per head and channel)
                    (``megatron_outeff.ops.gate``)
    gate_init_prob  every gate's value at initialisation, sigmoid(bias) (in (0, 1)); for the elementwise
                    gate its bias's (the gate is sigmoid(x W + b), W drawn like every weight)

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
            clip_alpha=None
            if self.clip_alpha is None
            else check_real("clip_alpha", self.clip_alpha, "alpha > 0 (gamma = -alpha / seq_length)", lambda x: x > 0),
            gate_init_prob=check_real(
                "gate_init_prob", self.gate_init_prob, "a probability in (0, 1)", lambda x: 0.0 < x < 1.0
            ),
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
        """Plain softmax attention: no sink (vanilla, or softmax_n with n = 0), no clip, no gate."""
        return sink_logit(self.softmax, self.softmax_n) is None and not self.clipped and not self.gated

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


# --------------------------------------------------------------------------------------------------
# The tensors a variant adds
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VariantTensor:
    """One tensor a variant adds to an attention layer, for all H heads of the layer.

    name       its name in the variant's math: the learnable offset's "softmax_offset"; a per-head gate's
               parameter name in ``ops.gate.head_gate`` ("weight", "bias", "fc1_weight", ..., "fc2_bias");
               the elementwise gate's "weight" / "bias" (its Linear, x W^T + b)
    shape      the full shape (every head), from the model's dims
    init       the constant a freshly initialised tensor holds, or None: drawn by the model's weight init
               (N(0, init_method_std)), like every other weight
    megatron   its name inside megatron-core's ``SelfAttention`` module (the layer's ``self_attention.``):
               "core_attention.softmax_offset" (megatron-core's own name), "head_gate.<name>"; a fused
               tensor names the megatron tensor holding its rows ("linear_qkv.weight")
    hf         its name inside the Hugging Face attention module (the layer's ``self_attn.``):
               "softmax_offset", "gate.<name>", "gate_proj.weight"
    tp_dim     the dim split by head across tensor-parallel ranks (rank r of T holds heads
               [r H/T, (r+1) H/T)): 0 for every tensor here; None would be replicated
    decay      whether the optimizer decays it (weights: yes; biases and the offset: no, as megatron-core)
    fused_qkv  rows of megatron's fused ``linear_qkv`` instead of a parameter of their own: per query group
               right after the group's query rows (megatron-core 0.16.1's ``attention_output_gate`` layout
               [q | gate | k | v] per group, d_head rows per head); megatron's own rule then applies to
               them (``decay`` says the same)

    Family-independent: names are relative to the attention module; a model family's mapping adds its
    layer prefix (OPT: ``decoder.layers.{i}.self_attention.`` / ``model.decoder.layers.{i}.self_attn.``).
    """

    name: str
    shape: Tuple[int, ...]
    init: Optional[float]
    megatron: str
    hf: str
    tp_dim: Optional[int]
    decay: bool
    fused_qkv: bool = False

    def initial_tensor(
        self, std: float, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A freshly initialised full tensor: ``init`` everywhere, or N(0, std) drawn from ``generator``."""
        if self.init is None:
            return torch.randn(self.shape, generator=generator, dtype=dtype) * std
        return torch.full(self.shape, self.init, dtype=dtype)


def logit(p: float) -> float:
    """log(p / (1 - p)): the bias whose sigmoid is p (a gate opening to p)."""
    return math.log(p / (1.0 - p))


def variant_tensors(
    variant: "AttentionVariantConfig", *, num_heads: int, head_dim: int, hidden_size: int, qkv_bias: bool = True
) -> Tuple[VariantTensor, ...]:
    """Every tensor ``variant`` adds to one attention layer of H = ``num_heads`` heads of width
    d = ``head_dim`` reading a ``hidden_size``-wide input, in creation order (``VariantTensor``).
    ``qkv_bias``: the model's QKV projection has a bias (OPT), so the elementwise gate has one too (its
    rows share megatron's linear_qkv bias); without one (Llama) the gate is sigmoid(x W^T), Qiu et al.'s form.

        learnable        softmax_offset [H], init 0
        linear           weight [H, d], bias [H]                     g_h = sigmoid(w_h . x_h + b_h)
        shared_linear    weight [H, hidden], bias [H]                g = sigmoid(W x + b)
        mlp              fc1_weight [H, r, d], fc1_bias [H, r] (init 0), fc2_weight [H, r], fc2_bias [H];
                         r = d // 4 (megatron names the output bias ``head_gate.bias``, as the others')
        elementwise      weight [H*d, hidden], bias [H*d] (if qkv_bias): megatron's linear_qkv rows,
                         Hugging Face's ``gate_proj`` Linear; g = sigmoid(x W^T + b) per head and channel

    Initial values, one per tensor (the same when training from scratch, when importing a Hugging Face
    OPT that lacks the tensor, and in the Hugging Face remote code's own init):
    * weights (init None): the model's weight init, N(0, init_method_std), like the layer's other weights;
    * a gate's output bias: logit(gate_init_prob), so every gate opens to gate_init_prob (Bondarenko et
      al.'s OPT scripts use 0.25, the default); for the elementwise gate, gate_init_prob 0.5 (bias 0) is
      megatron-core's own ``attention_output_gate`` initialisation (linear_qkv's bias starts at zero);
    * the mlp gate's hidden bias: 0;
    * the learnable offset: 0, i.e. a run starts as Softmax_1 (OutEffHop) and learns from there. Not
      megatron-core's N(0, init_method_std) draw: at OPT's std of 0.006 it only adds noise to that start,
      and a constant needs no random stream, so every TP layout, ``from-hf`` and Hugging Face's own init
      give the same value without a seed.

    Errors (one-line ValueError): the gate's shape rules: linear / mlp read head h's d-wide slice of the
    input (hidden_size == H * d); mlp needs d >= 4 (r >= 1).
    """
    H, d = int(num_heads), int(head_dim)
    out = []
    if variant.learnable_offset:
        out.append(
            VariantTensor(
                "softmax_offset", (H,), 0.0, "core_attention.softmax_offset", "softmax_offset", tp_dim=0, decay=False
            )
        )
    kind = variant.gate
    if kind == "none":
        return tuple(out)
    bias = logit(variant.gate_init_prob)
    if GATE_FAMILIES.get(kind) == "elementwise":
        out.append(
            VariantTensor(
                "weight",
                (H * d, hidden_size),
                None,
                "linear_qkv.weight",
                "gate_proj.weight",
                tp_dim=0,
                decay=True,
                fused_qkv=True,
            )
        )
        if qkv_bias:
            out.append(
                VariantTensor(
                    "bias", (H * d,), bias, "linear_qkv.bias", "gate_proj.bias", tp_dim=0, decay=False, fused_qkv=True
                )
            )
        return tuple(out)
    if kind in ("linear", "mlp") and d * H != hidden_size:
        raise ValueError(
            f"gate={kind!r} reads head h's d_head-wide slice of the input, which needs hidden_size "
            f"({hidden_size}) == num_attention_heads * head_dim ({H} * {d}); use gate='shared_linear'"
        )
    if kind == "shared_linear":
        shapes = {"weight": ((H, hidden_size), None), "bias": ((H,), bias)}
    elif kind == "linear":
        shapes = {"weight": ((H, d), None), "bias": ((H,), bias)}
    elif kind == "mlp":
        if d < 4:
            raise ValueError(
                f"gate='mlp' with head_dim={d}: the hidden width head_dim // 4 would be 0 (needs head_dim >= 4)"
            )
        r = d // 4
        shapes = {
            "fc1_weight": ((H, r, d), None),
            "fc1_bias": ((H, r), 0.0),
            "fc2_weight": ((H, r), None),
            "fc2_bias": ((H,), bias),
        }
    else:
        raise ValueError(f"gate={kind!r}: its tensors are not described (variants.variant_tensors)")
    for name, (shape, init) in shapes.items():
        megatron = "head_gate." + ("bias" if name == "fc2_bias" else name)
        out.append(VariantTensor(name, shape, init, megatron, "gate." + name, tp_dim=0, decay=init is None))
    return tuple(out)


def variant_tensor_owners(side: str) -> dict:
    """{name: the variant choices that add it, e.g. ("softmax='learnable'",) or ("gate='linear'",
    "gate='shared_linear'")} for every name (``side``: "hf" or "megatron", relative to the attention module)
    that some variant of the vocabulary gives a tensor of its own: how a reader tells a variant's tensors
    from a model family's own, and says whose a stray one is. megatron's fused linear_qkv rows are the
    family's tensor, not listed on the megatron side."""
    if side not in ("hf", "megatron"):
        raise ValueError(f"side={side!r}: expected 'hf' or 'megatron'")
    owners: dict = {}
    choices = [("softmax", s) for s in SOFTMAX_VARIANTS] + [("gate", g) for g in GATE_VARIANTS]
    for field_name, value in choices:
        variant = AttentionVariantConfig(**{field_name: value})
        for t in variant_tensors(variant, num_heads=1, head_dim=4, hidden_size=4):
            if not (side == "megatron" and t.fused_qkv):
                owners.setdefault(getattr(t, side), []).append(f"{field_name}={value!r}")
    return {name: tuple(v) for name, v in owners.items()}


def find_variant_tensor(tensors, side: str, name: str) -> VariantTensor:
    """The tensor of ``tensors`` (a ``variant_tensors`` result) whose ``side`` name ("name", "hf" or
    "megatron") is ``name``; a one-line ValueError naming it and the known names otherwise."""
    for t in tensors:
        if getattr(t, side) == name:
            return t
    raise ValueError(
        f"{name!r}: not a tensor of this attention variant, expected one of {[getattr(t, side) for t in tensors]}"
    )


def resolve_sink(
    softmax: str, n: float, offset: Optional[torch.Tensor], num_heads: int, device: torch.device
) -> Optional[torch.Tensor]:
    """The per-head sink logit a_h as an fp32 tensor [num_heads], or None for vanilla softmax.

    ``n``: the n of softmax_n. For ``learnable`` the returned tensor is ``offset`` promoted to at
    least fp32 (a differentiable cast, so gradients flow to ``offset``; an fp64 offset stays fp64
    for gradcheck).
    """
    value = sink_logit(softmax, n)
    if value == "offset":
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
    if value is None:
        return None
    return torch.full((num_heads,), value, dtype=torch.float32, device=device)


def sink_logit(softmax: str, n: float = 1.0):
    """The sink logit a_h of a softmax variant (``SINK_LOGITS``): a float, None (no sink) or "offset" (the
    learnable per-head tensor). One-line ValueError for an unknown name or a bad n."""
    check_choice("softmax", softmax, SOFTMAX_VARIANTS)
    if softmax not in SINK_LOGITS:
        raise ValueError(f"softmax={softmax!r}: no sink logit defined for it (variants.SINK_LOGITS)")
    rule = SINK_LOGITS[softmax]
    return rule(_softmax_n(n)) if callable(rule) else rule


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


def validate_attention_args(
    q, k, v, gate, key_padding_mask, scale, dropout_p, impl, mask=None
) -> Tuple[int, int, int, int, int, float]:
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
    optional = (  # (name, tensor, dtype check, expected dtype, shape check, expected shape)
        (
            "gate",
            gate,
            lambda t: t.is_floating_point(),
            "a floating dtype with values in (0, 1)",
            lambda s: s in ((b, sq, h), (b, sq, h, d)),
            f"({b}, {sq}, {h}) = [batch, sq, heads] (per head) or ({b}, {sq}, {h}, {d}) (elementwise)",
        ),
        (
            "key_padding_mask",
            key_padding_mask,
            lambda t: t.dtype == torch.bool,
            "torch.bool, True for real tokens",
            lambda s: s == (b, sk),
            f"({b}, {sk}) = [batch, sk]",
        ),
        (
            "mask",
            mask,
            lambda t: t.dtype == torch.bool,
            "torch.bool, True = masked out",
            lambda s: len(s) == 4 and all(m in (1, n) for m, n in zip(s, (b, h, sq, sk))),
            f"[b|1, h|1, sq|1, sk|1] = ({b}, {h}, {sq}, {sk}) or 1s",
        ),
    )
    for name, t, dtype_ok, dtype_expected, shape_ok, shape_expected in optional:
        if t is not None:
            _check_tensor(name, t, q.device, dtype_ok, dtype_expected, shape_ok, shape_expected)
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
