"""Hugging Face configuration of an OPT model with outlier-efficient attention.

Adds the attention-variant fields to transformers' ``OPTConfig``; everything else is OPT's.
Imports only torch-free transformers code, so an exported directory loads it with
``trust_remote_code=True`` without megatron_outeff installed.
"""
import math

from transformers import OPTConfig

SOFTMAX_CHOICES = ("vanilla", "softmax1", "softmax_n", "learnable")
GATE_CHOICES = ("none", "linear", "mlp", "shared_linear")


class OutEffOPTConfig(OPTConfig):
    """``OPTConfig`` plus the attention variant.

    softmax: "vanilla" | "softmax1" | "softmax_n" (uses ``softmax_n``) | "learnable" (a per-head
        parameter ``self_attn.softmax_offset`` [heads] is the sink logit).
    softmax_n: the n of softmax_n (n >= 0; only read when softmax == "softmax_n").
    clip_gamma, clip_zeta: clipped softmax clip((zeta - gamma) * p + gamma, 0, 1); both None = no
        clipping. An explicit gamma: the paper's gamma = -alpha / T form is resolved by the exporter.
    gate: "none" | "linear" (per-head Linear(d_head, 1)) | "mlp" (per-head d_head -> d_head // 4 ->
        ReLU -> 1) | "shared_linear" (one Linear(d_model, heads)). g = sigmoid(gate(x)) with x the
        attention layer's input, multiplies each head's output before out_proj.
    gate_init_prob: initial gate value sigmoid(bias) of a freshly initialised (not loaded) gate.
    """

    model_type = "outeff_opt"

    softmax: str = "softmax1"
    softmax_n: float | int = 1.0
    clip_gamma: float | int | None = None
    clip_zeta: float | int | None = None
    gate: str = "none"
    gate_init_prob: float | int = 0.25

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.softmax not in SOFTMAX_CHOICES:
            raise ValueError(f"softmax={self.softmax!r}: expected one of {SOFTMAX_CHOICES}")
        if not (isinstance(self.softmax_n, (int, float)) and math.isfinite(self.softmax_n) and self.softmax_n >= 0):
            raise ValueError(f"softmax_n={self.softmax_n!r}: expected a finite real number >= 0")
        if (self.clip_gamma is None) != (self.clip_zeta is None):
            raise ValueError(f"clip_gamma={self.clip_gamma!r}, clip_zeta={self.clip_zeta!r}: give both or neither")
        if self.clip_gamma is not None:
            if not (math.isfinite(self.clip_gamma) and self.clip_gamma <= 0):
                raise ValueError(f"clip_gamma={self.clip_gamma!r}: expected a finite gamma <= 0")
            if not (math.isfinite(self.clip_zeta) and self.clip_zeta >= 1):
                raise ValueError(f"clip_zeta={self.clip_zeta!r}: expected a finite zeta >= 1")
        if self.gate not in GATE_CHOICES:
            raise ValueError(f"gate={self.gate!r}: expected one of {GATE_CHOICES}")
        if not (0.0 < self.gate_init_prob < 1.0):
            raise ValueError(f"gate_init_prob={self.gate_init_prob!r}: expected a probability in (0, 1)")
        if self.gate == "mlp" and (self.hidden_size // self.num_attention_heads) // 4 < 1:
            raise ValueError(f"gate='mlp' needs head_dim >= 4 (head_dim = {self.hidden_size // self.num_attention_heads})")


__all__ = ["OutEffOPTConfig"]
