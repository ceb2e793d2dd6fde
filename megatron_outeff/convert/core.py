"""Checkpoint conversions, composed from the existing mappings (each model family's Hugging Face mapping,
models/hf_opt.py and models/hf_llama.py, chosen through models/family.py; hf/export.py) and the
checkpoint format (megatron_outeff.checkpoint_format: model files, merge / split of TP/PP shards).

    to_hf(ckpt, out_dir, iteration=None, tokenizer=None, dtype=None)     training / model-only checkpoint -> HF directory
    reshard(ckpt, out_dir, tp, pp, iteration=None)                      -> model-only checkpoint at another TP/PP
    from_hf(hf_dir, out_dir, tp, pp, variant=None, ...)                 HF OPT / Llama directory -> model-only checkpoint

All inputs are checked before anything is written; outputs go to a temporary sibling directory
renamed into place at the end. Errors: one-line ``OutEffError``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_outeff.checkpoint_format import (
    MODEL_SUBDIR,
    dtype_name,
    expected_rank_shapes,
    make_manifest,
    manifest_arch_variant,
    merge_ranks,
    rank_file_name,
    read_model_files,
    resolve_model_dir,
    resolved_variant,
    split_rank,
    tag_for,
    variant_hf_shapes,
    write_latest,
    write_manifest,
    write_rank_file,
)
from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.models.family import family_for_hf_model_type, family_of
from megatron_outeff.utils.atomic import atomic_output_dir, check_empty_output_dir
from megatron_outeff.utils.finite import require_finite

Progress = Optional[Callable[[str], None]]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _say(progress: Progress, msg: str) -> None:
    if progress:
        progress(msg)


def write_model_checkpoint(
    out_dir,
    rank_states: Callable[[int, int], dict],
    *,
    arch,
    variant,
    tp: int,
    pp: int,
    padded_vocab: int,
    seq_length,
    iteration: int,
    source: str,
    progress: Progress = None,
) -> Path:
    """A model-only checkpoint: OUT/latest + OUT/iter_XXXXXXX/model/{manifest.json, tp.._pp...safetensors}.
    ``rank_states(t, p)`` builds one rank's state dict (all are built and checked before the rename)."""
    out_dir = check_empty_output_dir(Path(out_dir))
    with atomic_output_dir(out_dir) as tmp:
        tag = tag_for(iteration)
        model_dir = tmp / tag / MODEL_SUBDIR
        states = []
        for p in range(pp):
            for t in range(tp):
                sd = rank_states(t, p)
                expected = expected_rank_shapes(arch, variant, t, tp, p, pp, padded_vocab)
                got = {k: tuple(v.shape) for k, v in sd.items()}
                if got != expected:
                    raise OutEffError(
                        f"internal: rank tp={t}, pp={p} tensors differ from the expected layout: "
                        f"{sorted(set(got) ^ set(expected))[:3]}"
                    )
                states.append(sd)
                write_rank_file(model_dir, t, p, sd)
                _say(progress, f"wrote {tag}/{MODEL_SUBDIR}/{rank_file_name(t, p)}")
        dtype = dtype_name(v for sd in states for v in sd.values())
        write_manifest(
            model_dir,
            make_manifest(
                arch=arch,
                variant=variant,
                tp=tp,
                pp=pp,
                padded_vocab_size=padded_vocab,
                dtype=dtype,
                seq_length=seq_length,
                iteration=iteration,
                source=source,
            ),
        )
        write_latest(tmp, tag)
    return out_dir


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------
def load_checkpoint_full(ckpt, iteration=None, progress: Progress = None):
    """(manifest, arch, variant, hf full state, padded embedding) of a checkpoint, everything checked."""
    model_dir = resolve_model_dir(ckpt, iteration)
    manifest, states = read_model_files(model_dir, progress=progress)
    arch, variant = manifest_arch_variant(manifest, str(model_dir))
    _say(progress, f"merging tp={manifest['tp']} x pp={manifest['pp']} ({arch.name}, {variant.describe()})")
    hf, padded = merge_ranks(states, arch, variant)
    return manifest, arch, variant, hf, padded


def to_hf(
    ckpt, out_dir, *, iteration=None, tokenizer=None, dtype: Optional[str] = None, progress: Progress = None
) -> Path:
    from megatron_outeff.hf import export_hf_dir

    out_dir = check_empty_output_dir(out_dir)
    if dtype not in (None, "fp32", "fp16", "bf16"):
        raise OutEffError(f"--dtype {dtype!r}: expected fp32, fp16 or bf16")
    with tempfile.TemporaryDirectory() as tok_tmp:
        tokenizer_dir = _hf_tokenizer_dir(tokenizer, Path(tok_tmp))
        manifest, arch, variant, hf, _ = load_checkpoint_full(ckpt, iteration, progress)
        family = family_of(arch)
        plain, extras = family.hf.split_variant_state(hf)
        config_kwargs = family.hf.hf_config_dict(arch)
        if tokenizer_dir is not None:  # training's refusal, naming the flag (export_hf_dir would name a temp dir)
            from megatron_outeff.data.tokenizer import check_vocab_fits
            from megatron_outeff.hf.export import hf_tokenizer_id_count

            try:
                n_ids = hf_tokenizer_id_count(tokenizer_dir)
            except OutEffError as e:
                raise with_context(f"--tokenizer {tokenizer}", e) from None
            check_vocab_fits(n_ids, arch.vocab_size, f"--tokenizer {tokenizer}")
        _say(progress, f"exporting to {out_dir} ({dtype or 'fp32'})")
        try:
            return export_hf_dir(
                out_dir,
                plain,
                config_kwargs,
                variant,
                seq_length=manifest.get("seq_length"),
                extra_state=extras,
                tokenizer_dir=tokenizer_dir,
                dtype=dtype or "fp32",
                family=family.name,
            )
        except ValueError as e:  # megatron_outeff.hf's checks of the written directory
            raise with_context("", e) from None


def _hf_tokenizer_dir(tokenizer, tmp: Path) -> Optional[Path]:
    """``--tokenizer``, checked before the checkpoint is read, as a directory of Hugging Face tokenizer files:
    the given directory, or ``tmp`` holding the conversion of a sentencepiece .model / bare tokenizer.json
    (megatron_outeff.hf.export.tokenizer_inputs decides which). OutEffError ``--tokenizer X: ...``."""
    if tokenizer is None:
        return None
    from megatron_outeff.data.hf_tokenizer import save_hf_tokenizer
    from megatron_outeff.hf.export import tokenizer_inputs

    try:
        _, source = tokenizer_inputs(tokenizer)
        if source is None:
            return Path(tokenizer)
        save_hf_tokenizer(source, tmp)
    except ValueError as e:
        raise with_context(f"--tokenizer {tokenizer}", e) from None
    return tmp


def reshard(ckpt, out_dir, *, tp: int, pp: int, iteration=None, progress: Progress = None) -> Path:
    from megatron_outeff.models.common import padded_vocab_size

    out_dir = check_empty_output_dir(out_dir)
    manifest, arch, variant, hf, padded = load_checkpoint_full(ckpt, iteration, progress)
    _check_target_layout(arch, tp, pp)
    old_rows = manifest["padded_vocab_size"]
    rows = old_rows if old_rows % tp == 0 else padded_vocab_size(arch.vocab_size, tp)
    return _write_split(
        out_dir,
        hf,
        padded,
        arch,
        variant,
        tp,
        pp,
        rows,
        seq_length=manifest.get("seq_length"),
        iteration=manifest["iteration"],
        source="reshard",
        progress=progress,
    )


def _check_target_layout(arch, tp: int, pp: int) -> None:
    """The family's check_parallel_layout of the --tp / --pp asked for, the error naming them."""
    try:
        family_of(arch).arch.check_parallel_layout(arch, tp, pp)
    except OutEffError as e:
        raise with_context(f"--tp {tp} --pp {pp}", e) from None


def _write_split(out_dir, full, padded, arch, variant, tp: int, pp: int, rows: int, **manifest) -> Path:
    """write_model_checkpoint of the full (Hugging Face-named) state dict ``full`` split for every rank of
    (tp, pp) with ``rows`` vocabulary rows (``padded``: the rows ``full``'s vocabulary tensors hold, None:
    unpadded); ``manifest``: write_model_checkpoint's seq_length, iteration, source, progress."""
    return write_model_checkpoint(
        out_dir,
        lambda t, p: split_rank(full, padded, arch, variant, t, tp, p, pp, rows),
        arch=arch,
        variant=variant,
        tp=tp,
        pp=pp,
        padded_vocab=rows,
        **manifest,
    )


def parse_variant(text):
    """--variant: a softmax name ("softmax1") or a JSON object of AttentionVariantConfig fields."""
    from megatron_outeff.ops.variants import AttentionVariantConfig

    if text is None:
        return None
    try:
        return AttentionVariantConfig.parse(text)
    except ValueError as e:
        raise OutEffError(f"--variant {text!r}: {e}") from None


def init_variant_tensors(arch, variant, seed: int = 0) -> dict[str, torch.Tensor]:
    """Initial values of the variant tensors a Hugging Face OPT / Llama lacks, each as ``ops.variants.variant_tensors``
    says (the same value training from scratch gives: offsets 0, gate biases logit(gate_init_prob), weights
    N(0, init_method_std) drawn from a generator seeded with ``seed``), under their Hugging Face names."""
    mapping = family_of(arch).hf
    g = torch.Generator().manual_seed(seed)
    tensors = mapping.variant_tensors_of(arch, variant)
    return {
        f"{mapping.HF_LAYER_PREFIX}{i}.{mapping.HF_ATTENTION}{t.hf}": t.initial_tensor(arch.init_method_std, g)
        for i in range(arch.num_layers)
        for t in tensors
    }


def read_hf_dir(hf_dir, variant=None, *, seq_length: Optional[int] = None, seed: int = 0, progress: Progress = None):
    """(arch, variant, HF full state incl. variant tensors, initialised variant tensor names) of a Hugging
    Face directory of a model family (models/family.py): the public layout (model_type opt, llama) or ours
    (outeff_opt, outeff_llama: the variant from config.json)."""
    from megatron_outeff.models.hf_opt import read_hf_safetensors
    from megatron_outeff.ops.variants import AttentionVariantConfig

    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise OutEffError(f"{hf_dir}: no config.json; expected a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise OutEffError(f"{cfg_path}: not JSON ({e})") from None
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    try:
        family = family_for_hf_model_type(mt)
    except OutEffError as e:
        raise with_context(str(cfg_path), e) from None
    if mt == family.remote_model_type:
        try:
            ours = AttentionVariantConfig.from_fields(cfg)
        except ValueError as e:
            raise OutEffError(f"{cfg_path}: bad attention variant: {e}") from None
        if variant is not None and resolved_variant(variant, seq_length, "--variant") != ours:
            raise OutEffError(f"--variant {variant.describe()!r} contradicts {cfg_path}'s {ours.describe()!r}")
        variant = ours
        cfg = {k: v for k, v in cfg.items() if k not in AttentionVariantConfig.field_names()}
        cfg["model_type"] = family.hf_model_type
    variant = variant or AttentionVariantConfig()
    arch = family.hf.arch_from_hf_config(cfg, name=hf_dir.name or None)
    sd = read_hf_safetensors(hf_dir, on_file=lambda name: _say(progress, f"reading {name}"))
    plain, extras = family.hf.split_variant_state(sd)
    try:
        family.hf.validate_hf_state_dict(plain, arch)
    except OutEffError as e:
        raise with_context(str(hf_dir), e) from None
    expected = variant_hf_shapes(arch, variant)
    unexpected = sorted(set(extras) - set(expected))
    if unexpected:
        raise OutEffError(f"{hf_dir}: tensor(s) {unexpected[:3]} do not belong to the variant {variant.describe()!r}")
    for k, v in extras.items():
        if tuple(v.shape) != expected[k]:
            raise OutEffError(f"{hf_dir}: {k} has shape {tuple(v.shape)}, expected {expected[k]}")
    initialised = sorted(set(expected) - set(extras))
    if initialised and extras:
        raise OutEffError(
            f"{hf_dir}: has some but not all tensors of the variant {variant.describe()!r}, e.g. missing {initialised[:3]}"
        )
    full = dict(plain)
    full.update(extras)
    if initialised:
        full.update(init_variant_tensors(arch, variant, seed))
    for k, v in full.items():
        require_finite(v, f"{hf_dir}: {k}")
    return arch, variant, full, initialised


def from_hf(
    hf_dir,
    out_dir,
    *,
    tp: int = 1,
    pp: int = 1,
    variant=None,
    seq_length: Optional[int] = None,
    seed: int = 0,
    progress: Progress = None,
) -> Path:
    from megatron_outeff.models.common import padded_vocab_size

    out_dir = check_empty_output_dir(out_dir)
    if isinstance(variant, (str, type(None))):
        variant = parse_variant(variant)
    arch, variant, full, initialised = read_hf_dir(hf_dir, variant, seq_length=seq_length, seed=seed, progress=progress)
    if variant.clip_alpha is not None and not seq_length:
        raise OutEffError(f"variant clip_alpha={variant.clip_alpha} needs --seq-length (gamma = -alpha / seq_length)")
    _check_target_layout(arch, tp, pp)
    if initialised:
        _say(
            progress,
            f"initialised {len(initialised)} variant tensor(s) the Hugging Face model lacks "
            f"(offsets 0, gates open to {variant.gate_init_prob})",
        )
    rows = padded_vocab_size(arch.vocab_size, tp)
    return _write_split(
        out_dir,
        full,
        None,
        arch,
        variant,
        tp,
        pp,
        rows,
        seq_length=seq_length,
        iteration=0,
        source="from-hf",
        progress=progress,
    )
