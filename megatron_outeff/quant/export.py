"""The deployable copies of a Hugging Face model (tools/export_fp16_w8a8.py): OUT/fp16 and OUT/w8a8.

    check_export_dirs(output_dir, targets)   refuse (OutEffError) an OUT/fp16 or OUT/w8a8 that exists and
                                             is not an empty directory, before anything is loaded or written
    check_tokenizers(model_dir, tokenizer, vocab_size)
                                             refuse a tokenizer with more ids than the model's vocabulary
                                             (training's refusal): --tokenizer and the copied tokenizer files
    export_fp16(model, model_dir, batches, out_dir)
        fp16 safetensors in Hugging Face layout (remote-code files and tokenizer copied); refused
        (OutEffError) when a weight, or any fp16 intermediate on the calibration ``batches``, overflows
        fp16 (megatron_outeff.hf.export's fp16_overflow_report / fp16_overflow_check)
    export_w8a8(model, model_dir, batches, out_dir) -> {Linear name: LinearW8A8}
        compressed-tensors "int-quantized" W8A8 (export_compressed_tensors_w8a8: per-channel int8
        weights, static per-tensor activations calibrated on ``batches``; the LM head stays float)
    calibration_fn(batches, device=None)     the ``calibrate(model)`` callable that runs the batches

``model``: the float Hugging Face model loaded from ``model_dir`` (evaluation.quant_eval.load_hf_model);
``batches``: input_ids tensors [b, s]. Each output directory is written under a temporary name and
renamed when complete. In this package "export" means writing such a deployable copy; a training
checkpoint becomes a Hugging Face directory through megatron_outeff.convert (to_hf).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.utils.atomic import atomic_output_dir, check_empty_output_dir

from .compressed_tensors_export import LinearW8A8, export_compressed_tensors_w8a8

__all__ = ["TARGETS", "calibration_fn", "check_export_dirs", "check_tokenizers", "export_fp16", "export_w8a8"]

TARGETS = ("fp16", "w8a8")


def calibration_fn(batches: Sequence[torch.Tensor], device=None) -> Callable:
    """``calibrate(model)``: the model run on every batch of input_ids (moved to ``device`` if given)."""

    def run(m):
        for b in batches:
            m(input_ids=b if device is None else b.to(device), use_cache=False)

    return run


def check_export_dirs(output_dir, targets: Iterable[str]) -> None:
    """OutEffError if no target is asked for, or if OUTPUT_DIR/<target> exists and is not an empty directory."""
    targets = list(targets)
    if not targets:
        raise OutEffError("nothing to do: both --skip-fp16 and --skip-w8a8 given")
    for name in targets:
        check_empty_output_dir(Path(output_dir) / name)


def check_tokenizers(model_dir, tokenizer, vocab_size: int) -> None:
    """OutEffError (``data.tokenizer.check_vocab_fits``, training's refusal) when ``tokenizer`` (the one the
    calibration data is tokenized with: a path, or None) or the tokenizer files of ``model_dir`` (copied
    into OUT/fp16 and OUT/w8a8) hold more ids than the model's ``vocab_size``."""
    from megatron_outeff.data.tokenizer import check_vocab_fits, tokenizer_id_count
    from megatron_outeff.hf.export import TOKENIZER_FILES, hf_tokenizer_id_count

    if vocab_size is None:
        return
    if tokenizer is not None:
        check_vocab_fits(tokenizer_id_count(tokenizer), vocab_size, f"--tokenizer {tokenizer}")
    if any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        try:
            n = hf_tokenizer_id_count(model_dir)
        except OutEffError as e:
            raise with_context(str(model_dir), e) from None
        check_vocab_fits(n, vocab_size, f"{model_dir}'s tokenizer")


def _copy_tokenizer(src, dst) -> None:
    from megatron_outeff.hf.export import TOKENIZER_FILES

    for f in TOKENIZER_FILES:
        if (Path(src) / f).is_file():
            shutil.copyfile(Path(src) / f, Path(dst) / f)


def export_fp16(model: torch.nn.Module, model_dir, batches: Sequence[torch.Tensor], out_dir) -> None:
    """An fp16 copy of ``model`` in Hugging Face layout at ``out_dir`` (see the module doc)."""
    from megatron_outeff.hf.export import fp16_overflow_check, fp16_overflow_report

    over = fp16_overflow_report(model.state_dict())
    if over:
        raise OutEffError(f"fp16 refused: {len(over)} weight(s) overflow fp16: {over[0]} (use --skip-fp16)")
    first = fp16_overflow_check(model, batches)
    if first:
        raise OutEffError(f"fp16 refused: {first} (use --skip-fp16 to write only w8a8)")
    with atomic_output_dir(Path(out_dir)) as tmp:
        copy.deepcopy(model).half().save_pretrained(tmp)
        # remote code: save_pretrained copies the modeling file and its relative imports; copy any
        # other .py of the source directory too so the directory stays self-contained.
        for f in Path(model_dir).glob("*.py"):
            if not (tmp / f.name).exists():
                shutil.copyfile(f, tmp / f.name)
        _copy_tokenizer(model_dir, tmp)


def export_w8a8(model: torch.nn.Module, model_dir, batches: Sequence[torch.Tensor], out_dir) -> dict[str, LinearW8A8]:
    """The compressed-tensors W8A8 checkpoint of ``model`` at ``out_dir``, with the tokenizer files of
    ``model_dir``; returns the per-Linear parameters written."""
    params = export_compressed_tensors_w8a8(model, calibration_fn(batches), out_dir)
    _copy_tokenizer(model_dir, out_dir)
    return params
