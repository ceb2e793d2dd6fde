"""Model-parallel shards of the model files: merge every (tp, pp) rank into one full state, split it for
another layout, and load a checkpoint's weights into this rank's megatron model at any layout.

The full state in between is the family's Hugging Face state dict plus the variant tensors (the
family's ``megatron_to_hf_state_dict(..., variant=...)``: models/family.py; ``ops.variants.variant_tensors``)
and the megatron vocabulary-parallel tensors with their vocabulary-padding rows (``padded``: the word
embedding, and the LM head where it is not tied to it; the padding rows take part in the training loss
through the LM head, so a re-split keeps them; Hugging Face drops them). Errors: one-line ``OutEffError``.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.models.family import family_of

from .model_files import manifest_arch_variant, read_manifest, read_model_files, resolve_model_dir

__all__ = ["load_into_model", "merge_ranks", "resolved_variant", "split_rank"]

EMBED = "embedding.word_embeddings.weight"


def merge_ranks(states: Mapping[tuple, dict], arch, variant) -> tuple[dict, dict]:
    """({HF + ``variant``'s tensors}, {megatron key: the full padded vocabulary-parallel tensor}) of every
    rank's state (``padded``: the word embedding, and the LM head of an untied family)."""
    mapping = family_of(arch).hf
    tp, pp = max(t for t, _ in states) + 1, max(p for _, p in states) + 1
    sources = sorted(set(mapping.VOCAB_PARALLEL.values()))
    tied = sources == [EMBED]
    if pp > 1 and tied:
        # The last stage's tied LM-head copy: training re-syncs it from the first stage's embedding
        # before every step (training.step.sync_tied_embedding), so a checkpoint written after a step
        # may hold a stale copy. The embedding is authoritative.
        states = dict(states)
        for t in range(tp):
            states[(t, pp - 1)] = dict(
                states[(t, pp - 1)], **{"output_layer.weight": states[(t, 0)]["embedding.word_embeddings.weight"]}
            )
    hf = mapping.megatron_to_hf_state_dict(states, arch, strict=True, variant=variant)
    stage = {EMBED: 0}  # the embedding on the first stage, everything else (the LM head) on the last
    padded = {k: torch.cat([states[(t, stage.get(k, pp - 1))][k] for t in range(tp)], dim=0) for k in sources}
    return hf, padded


def split_rank(
    hf: Mapping[str, torch.Tensor],
    padded: Optional[Mapping[str, torch.Tensor]],
    arch,
    variant,
    tp_rank: int,
    tp: int,
    pp_rank: int,
    pp: int,
    vocab_rows: int,
) -> dict[str, torch.Tensor]:
    """Rank (tp_rank, pp_rank)'s megatron state dict (``variant``'s tensors included); its vocabulary-parallel
    tensors (the embedding, the LM head or the last stage's tied copy) cut from ``padded`` (``merge_ranks``;
    padding rows kept, zero rows added if ``vocab_rows`` is larger); None: from ``hf`` with zero padding rows."""
    mapping = family_of(arch).hf
    sd = mapping.hf_state_dict_to_megatron(hf, arch, tp_rank, tp, pp_rank, pp, vocab_size=vocab_rows, variant=variant)
    for key, source in mapping.VOCAB_PARALLEL.items():
        if padded is None or key not in sd:
            continue
        full = padded[source][:vocab_rows]
        if full.shape[0] < vocab_rows:
            full = torch.cat([full, full.new_zeros(vocab_rows - full.shape[0], full.shape[1])])
        sd[key] = full.chunk(tp, dim=0)[tp_rank].clone()
    return sd


def resolved_variant(variant, seq_length, where):
    try:
        return variant.resolved(seq_length)
    except ValueError as e:  # megatron_outeff.megatron.variant's check
        raise with_context(where, e) from None


def load_into_model(
    model: torch.nn.Module,
    path,
    *,
    arch,
    variant,
    seq_length,
    tp_rank: int,
    tp: int,
    pp_rank: int,
    pp: int,
    progress=None,
) -> dict:
    """Load a checkpoint's model files (a training or model-only checkpoint) into this rank's megatron
    model at any layout: its own rank file as is when the layout matches, else all ranks merged and
    re-split for (tp_rank, pp_rank). The architecture and the (resolved) attention variant must match.
    Returns the manifest (with ``weights_read`` / ``weights_read_text``, see ``read_model_files``)."""
    from megatron_outeff.models.hf_opt import load_megatron_state_dict

    while hasattr(model, "module"):
        model = model.module
    model_dir = resolve_model_dir(path)
    manifest = read_manifest(model_dir)
    src_arch, src_variant = manifest_arch_variant(manifest, str(model_dir))
    if src_arch.family != arch.family:
        raise OutEffError(
            f"{path}: a {src_arch.family} checkpoint ({src_arch.name}); the config's model.arch is "
            f"{arch.name}, a {arch.family} model"
        )
    family_of(arch).hf.check_same_architecture(src_arch, arch, what=str(path))
    mine = resolved_variant(variant, seq_length, "the training config")
    theirs = resolved_variant(src_variant, manifest.get("seq_length"), str(model_dir))
    if mine != theirs:
        raise OutEffError(
            f"{path}: attention variant {theirs.describe()!r} differs from the config's {mine.describe()!r}"
        )
    rows = model.vocab_size
    manifest, states = read_model_files(model_dir, progress=progress)
    if (manifest["tp"], manifest["pp"], manifest["padded_vocab_size"]) == (tp, pp, rows):
        sd = states[(tp_rank, pp_rank)]  # same layout: this rank's file as is
    else:
        hf, padded = merge_ranks(states, src_arch, src_variant)
        sd = split_rank(hf, padded, src_arch, src_variant, tp_rank, tp, pp_rank, pp, rows)
    try:
        with torch.no_grad():
            load_megatron_state_dict(model, sd)
    except (ValueError, RuntimeError) as e:
        raise with_context(str(path), ValueError(str(e).splitlines()[0])) from None
    return manifest
