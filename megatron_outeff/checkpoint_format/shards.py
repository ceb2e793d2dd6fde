"""Model-parallel shards of the model files: merge every (tp, pp) rank into one full state, split it for
another layout, and load a checkpoint's weights into this rank's megatron model at any layout.

The full state in between is the Hugging Face OPT state dict plus the variant tensors
(``models.hf_opt.megatron_to_hf_state_dict(..., variant=...)``: ``ops.variants.variant_tensors``) and the megatron word
embedding with its vocabulary-padding rows (they take part in the training loss through the tied LM
head, so a re-split keeps them; Hugging Face drops them). Errors: one-line ``OutEffError``.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from megatron_outeff.errors import OutEffError, with_context
from .model_files import manifest_arch_variant, read_manifest, read_model_files, resolve_model_dir


def merge_ranks(states: Mapping[tuple, dict], arch, variant) -> tuple[dict, torch.Tensor]:
    """({HF OPT + ``variant``'s tensors}, the full padded megatron word embedding) of every rank's state."""
    from megatron_outeff.models.hf_opt import megatron_to_hf_state_dict

    tp, pp = max(t for t, _ in states) + 1, max(p for _, p in states) + 1
    if pp > 1:
        # The last stage's tied LM-head copy: training re-syncs it from the first stage's embedding
        # before every step (training.step.sync_tied_embedding), so a checkpoint written after a step
        # may hold a stale copy. The embedding is authoritative.
        states = dict(states)
        for t in range(tp):
            states[(t, pp - 1)] = dict(states[(t, pp - 1)],
                                       **{"output_layer.weight": states[(t, 0)]["embedding.word_embeddings.weight"]})
    hf = megatron_to_hf_state_dict(states, arch, strict=True, variant=variant)
    padded = torch.cat([states[(t, 0)]["embedding.word_embeddings.weight"] for t in range(tp)], dim=0)
    return hf, padded


def split_rank(hf: Mapping[str, torch.Tensor], padded_embed: Optional[torch.Tensor], arch, variant, tp_rank: int,
               tp: int, pp_rank: int, pp: int, vocab_rows: int) -> dict[str, torch.Tensor]:
    """Rank (tp_rank, pp_rank)'s megatron state dict (``variant``'s tensors included); the embedding (and the
    last stage's tied copy) taken from ``padded_embed`` (padding rows kept, zero rows added if ``vocab_rows``
    is larger)."""
    from megatron_outeff.models.hf_opt import hf_state_dict_to_megatron

    sd = hf_state_dict_to_megatron(hf, arch, tp_rank, tp, pp_rank, pp, vocab_size=vocab_rows, variant=variant)
    if padded_embed is not None:
        emb = padded_embed[:vocab_rows]
        if emb.shape[0] < vocab_rows:
            emb = torch.cat([emb, emb.new_zeros(vocab_rows - emb.shape[0], emb.shape[1])])
        mine = emb.chunk(tp, dim=0)[tp_rank].clone()
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if key in sd:
                sd[key] = mine.clone()
    return sd


def resolved_variant(variant, seq_length, where):
    try:
        return variant.resolved(seq_length)
    except ValueError as e:  # megatron_outeff.megatron.variant's check
        raise with_context(where, e) from None


def load_into_model(model: torch.nn.Module, path, *, arch, variant, seq_length, tp_rank: int, tp: int, pp_rank: int,
                    pp: int, progress=None) -> dict:
    """Load a checkpoint's model files (a training or model-only checkpoint) into this rank's megatron
    model at any layout: its own rank file as is when the layout matches, else all ranks merged and
    re-split for (tp_rank, pp_rank). The architecture and the (resolved) attention variant must match.
    Returns the manifest (with ``weights_read`` / ``weights_read_text``, see ``read_model_files``)."""
    from megatron_outeff.models.hf_opt import check_same_architecture, load_megatron_state_dict

    while hasattr(model, "module"):
        model = model.module
    model_dir = resolve_model_dir(path)
    manifest = read_manifest(model_dir)
    src_arch, src_variant = manifest_arch_variant(manifest, str(model_dir))
    check_same_architecture(src_arch, arch, what=str(path))
    mine = resolved_variant(variant, seq_length, "the training config")
    theirs = resolved_variant(src_variant, manifest.get("seq_length"), str(model_dir))
    if mine != theirs:
        raise OutEffError(f"{path}: attention variant {theirs.describe()!r} differs from the config's {mine.describe()!r}")
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
