"""One typed description of an outlier-efficient attention variant.

``AttentionVariantConfig`` is what every layer of this package (megatron-core specs, the OPT model
family, training scripts) passes around. It combines three independent choices:

softmax   the normaliser (see ``megatron_outeff.ops.variants``):
              p_i = exp(x_i) / (exp(a_h) + sum_j exp(x_j))
          vanilla (no a_h) | softmax1 (a_h = 0, OutEffHop) | softmax_n (a_h = log n) |
          learnable (a_h a trained per-head parameter, megatron-core's ``softmax_offset``).
clip      clipped softmax (Bondarenko et al. 2023): p -> clip((zeta - gamma) p + gamma, 0, 1),
          either (clip_gamma, clip_zeta) directly or the paper's OPT form clip_alpha:
          gamma = -alpha / T, zeta = 1, T the training sequence length (known only when a model
          is built, hence ``clip_pair(seq_length)``).
gate      gated attention: per head h, g_h = sigmoid(G_h(x_h)) with x_h head h's d_head-wide slice of
          the attention layer's input; the head's output is multiplied by g_h before the output
          projection. none | linear (Linear(d_head, 1) per head) | mlp (d_head -> d_head/4 -> 1 per
          head) | shared_linear (one Linear(d_model, H)). The gate bias starts at
          logit(gate_init_prob), so every gate opens to ~gate_init_prob at initialisation.

Knows nothing of megatron's modules (only the names of megatron's ``softmax_type`` values).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

SOFTMAX_NAMES = ("vanilla", "softmax1", "softmax_n", "learnable")
GATE_NAMES = ("none", "linear", "mlp", "shared_linear")

# megatron-core TransformerConfig.softmax_type -> our softmax name. 'off-by-one' is Softmax_1
# (a zero offset that megatron keeps as a non-trainable tensor).
_FROM_MEGATRON = {"vanilla": "vanilla", "off-by-one": "softmax1", "learnable": "learnable"}


@dataclass(frozen=True)
class AttentionVariantConfig:
    """An attention variant: softmax normaliser x optional clipping x optional per-head gate."""

    softmax: str = "vanilla"
    n: float = 1.0  # only for softmax="softmax_n"
    clip_gamma: Optional[float] = None  # clipped softmax lower stretch (<= 0); None = no clipping
    clip_zeta: float = 1.0  # clipped softmax upper stretch (>= 1)
    clip_alpha: Optional[float] = None  # paper form: gamma = -alpha / seq_length, zeta = 1
    gate: str = "none"
    gate_init_prob: float = 0.25  # sigmoid(bias) at initialisation

    def __post_init__(self):
        if self.softmax not in SOFTMAX_NAMES:
            raise ValueError(f"softmax={self.softmax!r}: expected one of {SOFTMAX_NAMES}")
        if self.gate not in GATE_NAMES:
            raise ValueError(f"gate={self.gate!r}: expected one of {GATE_NAMES}")
        n = _finite("n", self.n)
        if n < 0:
            raise ValueError(f"n={n}: expected n >= 0 (softmax_n adds n to the normaliser)")
        if self.clip_gamma is not None and self.clip_alpha is not None:
            raise ValueError(
                f"clip_gamma={self.clip_gamma} and clip_alpha={self.clip_alpha}: give one of them, not both"
            )
        if self.clip_gamma is not None and _finite("clip_gamma", self.clip_gamma) > 0:
            raise ValueError(f"clip_gamma={self.clip_gamma}: expected gamma <= 0")
        if _finite("clip_zeta", self.clip_zeta) < 1:
            raise ValueError(f"clip_zeta={self.clip_zeta}: expected zeta >= 1")
        if self.clip_alpha is not None:
            if _finite("clip_alpha", self.clip_alpha) <= 0:
                raise ValueError(f"clip_alpha={self.clip_alpha}: expected alpha > 0 (gamma = -alpha / seq_length)")
            if self.clip_zeta != 1.0:
                raise ValueError(f"clip_alpha with clip_zeta={self.clip_zeta}: the alpha form fixes zeta = 1")
        p = _finite("gate_init_prob", self.gate_init_prob)
        if not 0.0 < p < 1.0:
            raise ValueError(f"gate_init_prob={p}: expected a probability in (0, 1)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "AttentionVariantConfig":
        """From a plain mapping (YAML/JSON config); unknown keys are an error."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"attention variant {d!r}: expected a mapping of {cls.field_names()}")
        for key in d:
            if key not in cls.field_names():
                raise ValueError(f"attention variant key {key!r}: unknown; expected one of {cls.field_names()}")
        return cls(**dict(d))

    @classmethod
    def from_megatron_softmax_type(cls, softmax_type: str, **overrides) -> "AttentionVariantConfig":
        """megatron-core ``TransformerConfig.softmax_type`` ('vanilla' | 'off-by-one' | 'learnable')."""
        if softmax_type not in _FROM_MEGATRON:
            raise ValueError(f"megatron softmax_type={softmax_type!r}: expected one of {tuple(_FROM_MEGATRON)}")
        return cls(softmax=_FROM_MEGATRON[softmax_type], **overrides)

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

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

    def clip_pair(self, seq_length: Optional[int] = None) -> Optional[Tuple[float, float]]:
        """(gamma, zeta) for ``megatron_outeff.ops.outeff_attention(clip=...)``, or None.

        The alpha form needs the training sequence length T: gamma = -alpha / T, zeta = 1.
        """
        if self.clip_gamma is not None:
            return (float(self.clip_gamma), float(self.clip_zeta))
        if self.clip_alpha is None:
            return None
        if seq_length is None or int(seq_length) <= 0:
            raise ValueError(
                f"clip_alpha={self.clip_alpha} needs the training sequence length (gamma = -alpha / seq_length); got {seq_length!r}"
            )
        return (-float(self.clip_alpha) / int(seq_length), 1.0)

    def resolved(self, seq_length: Optional[int] = None) -> "AttentionVariantConfig":
        """The same variant with the alpha form turned into an explicit gamma for ``seq_length``."""
        if self.clip_alpha is None:
            return self
        gamma, zeta = self.clip_pair(seq_length)
        return dataclasses.replace(self, clip_alpha=None, clip_gamma=gamma, clip_zeta=zeta)

    def megatron_softmax_type(self) -> Optional[str]:
        """The equivalent megatron-core ``softmax_type``, or None when megatron has no equivalent."""
        if self.clipped or self.gated:
            return None
        if self.softmax == "softmax_n":
            return "off-by-one" if self.n == 1.0 else ("vanilla" if self.n == 0 else None)
        return {"vanilla": "vanilla", "softmax1": "off-by-one", "learnable": "learnable"}[self.softmax]

    def describe(self) -> str:
        """Short human-readable name, e.g. 'gated(linear) softmax1' or 'clipped(-0.03,1) vanilla'."""
        parts = []
        if self.gated:
            parts.append(f"gated({self.gate})")
        if self.clip_gamma is not None:
            parts.append(f"clipped({self.clip_gamma:g},{self.clip_zeta:g})")
        elif self.clip_alpha is not None:
            parts.append(f"clipped(alpha={self.clip_alpha:g})")
        parts.append(f"softmax_n(n={self.n:g})" if self.softmax == "softmax_n" else self.softmax)
        return " ".join(parts)


def _finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected a real number") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    return v
