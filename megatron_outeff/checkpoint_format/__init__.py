"""The on-disk checkpoint format, below both training (which writes it) and convert (which reads and
rewrites it): the directory tree, ``latest``, ``run.json``, the model files and their manifest, and the
merge / split of model-parallel shards. The whole tree, DeepSpeed's files included: README.md here.
"""
from .layout import (
    LATEST, MANIFEST, MASTER_SUBDIR, MODEL_SUBDIR, MOMENTS, OPTIM_FORMAT, OPTIM_FORMAT_VERSION, OPTIM_STATE,
    OPTIM_SUBDIR, RUN_FILE, TRAIN_STATE, checkpoint_tags,
    is_partial_tag, latest_tag, partial_tag, rank_file_name, read_latest, read_run_file, read_train_state, rng_file,
    tag_for, write_latest, write_run_file, write_train_state,
)
from .model_files import (
    FORMAT, FORMAT_VERSION, dtype_name, expected_rank_shapes, make_manifest, manifest_arch_variant, read_manifest,
    read_model_files, resolve_model_dir, tensor_state, variant_hf_shapes, write_manifest, write_rank_file,
)
from .shards import load_into_model, merge_ranks, resolved_variant, split_rank

__all__ = [
    "FORMAT", "FORMAT_VERSION", "LATEST", "MANIFEST", "MASTER_SUBDIR", "MODEL_SUBDIR", "MOMENTS", "OPTIM_FORMAT",
    "OPTIM_FORMAT_VERSION", "OPTIM_STATE", "OPTIM_SUBDIR", "RUN_FILE", "TRAIN_STATE",
    "checkpoint_tags", "dtype_name", "expected_rank_shapes", "is_partial_tag", "latest_tag",
    "load_into_model", "make_manifest", "manifest_arch_variant", "merge_ranks", "partial_tag", "rank_file_name",
    "read_latest", "read_manifest", "read_model_files", "read_run_file", "read_train_state", "resolve_model_dir",
    "resolved_variant", "rng_file", "split_rank", "tag_for", "tensor_state", "variant_hf_shapes", "write_latest",
    "write_manifest", "write_rank_file", "write_run_file", "write_train_state",
]
