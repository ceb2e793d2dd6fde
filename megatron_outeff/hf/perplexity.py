"""Perplexity of a causal language model on token blocks.

    perplexity(model, blocks=None, *, text=None, tokenizer=None, block_size=None,
               batch_size=8, device=None, add_special_tokens=False) -> {"loss", "ppl", "tokens"}

``model``: a Hugging Face causal LM (called as ``model(input_ids=...)``, ``.logits`` read) or any
callable mapping input_ids [b, s] to logits [b, s, vocab]. Inputs: ``blocks`` (a LongTensor
[n, s] or a list of token-id sequences, lengths may differ), or ``text`` (a str or list of str)
with a ``tokenizer``: the texts are tokenized one by one, concatenated, and cut into consecutive
non-overlapping blocks of ``block_size`` tokens (the last, shorter block is kept).

Within each block, token t+1 is predicted from tokens <= t, so a block of s tokens contributes
s - 1 predictions; blocks are independent (no context carried across). ``loss`` is the exact
token-weighted mean NLL over all predictions (summed in float64), ``ppl`` = exp(loss), ``tokens``
the number of predictions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Optional, Sequence, Union

import torch


def tokenize_blocks(
    text: Union[str, Sequence[str]], tokenizer, block_size: int, add_special_tokens: bool = False
) -> list[list[int]]:
    """Tokenize each text, concatenate, cut into blocks of ``block_size`` tokens (last block may be shorter).

    add_special_tokens=True adds the tokenizer's special tokens to every text (OPT's tokenizer prepends
    </s>), as transformers' run_clm.py pipeline (used by the paper's authors) does.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size={block_size!r}: expected an int >= 2")
    texts = [text] if isinstance(text, str) else list(text)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"])
    return [ids[i : i + block_size] for i in range(0, len(ids), block_size)]


def _logits_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):

        def fn(ids):
            out = model(input_ids=ids, use_cache=False)
            return out.logits if hasattr(out, "logits") else out[0]

        return fn
    return model


@torch.no_grad()
def perplexity(
    model,
    blocks=None,
    *,
    text=None,
    tokenizer=None,
    block_size: Optional[int] = None,
    batch_size: int = 8,
    device=None,
    add_special_tokens: bool = False,
) -> dict:
    """Token-weighted perplexity; see the module docstring."""
    if (blocks is None) == (text is None):
        raise ValueError("perplexity: give exactly one of blocks= or text= (with tokenizer= and block_size=)")
    if text is not None:
        if tokenizer is None or block_size is None:
            raise ValueError("perplexity: text= needs tokenizer= and block_size=")
        blocks = tokenize_blocks(text, tokenizer, block_size, add_special_tokens)
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 2:
            raise ValueError(f"perplexity: blocks of shape {tuple(blocks.shape)}: expected [n, seq]")
        blocks = [b for b in blocks]
    by_len = defaultdict(list)
    for b in blocks:
        b = torch.as_tensor(b, dtype=torch.long).flatten()
        if b.numel() >= 2:
            by_len[b.numel()].append(b)
    if not by_len:
        raise ValueError("perplexity: no block with at least 2 tokens")
    if device is None and isinstance(model, torch.nn.Module):
        p = next(model.parameters(), None)
        device = p.device if p is not None else None
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if was_training:
        model.eval()
    fn = _logits_fn(model)
    total_nll = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    try:
        for length in sorted(by_len):
            group = by_len[length]
            for i in range(0, len(group), batch_size):
                ids = torch.stack(group[i : i + batch_size])
                if device is not None:
                    ids = ids.to(device)
                logits = fn(ids)
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += nll.double().cpu()
                n_tokens += ids[:, 1:].numel()
    finally:
        if was_training:
            model.train()
    loss = float(total_nll) / n_tokens
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n_tokens}


__all__ = ["perplexity", "tokenize_blocks"]
