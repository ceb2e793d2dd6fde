"""Outlier metrics (the paper's definitions) and a hook-based collector. No Megatron/DeepSpeed."""
from .outliers import (
    COMPONENT_KINDS,
    KURTOSIS_EPS,
    OutlierCollector,
    attention_sink_mass,
    hf_opt_collector,
    hf_opt_components,
    inf_norm,
    inf_norm_per_sample,
    kurtosis,
    kurtosis_per_sample,
    outlier_channels,
    outlier_share,
    per_sample_rows,
)

__all__ = [
    "COMPONENT_KINDS",
    "KURTOSIS_EPS",
    "OutlierCollector",
    "attention_sink_mass",
    "hf_opt_collector",
    "hf_opt_components",
    "inf_norm",
    "inf_norm_per_sample",
    "kurtosis",
    "kurtosis_per_sample",
    "outlier_channels",
    "outlier_share",
    "per_sample_rows",
]
