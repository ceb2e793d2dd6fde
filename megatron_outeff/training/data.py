"""The one data interface the training loop reads from.

A ``BatchSource`` yields this rank's micro-batches, each a dict of CPU tensors:
  tokens [b, s] int64, labels [b, s] int64, loss_mask [b, s] float, position_ids [b, s] int64,
and remembers how many samples the whole job has consumed (``state_dict``/``load_state_dict``), so a
resumed run continues exactly where it stopped.

Global sample order: optimizer step k consumes global samples [k*G, (k+1)*G) (G = global batch).
Micro-batch m of data-parallel rank r holds samples k*G + (m*DP + r)*b ... + b - 1. Any layout
(DP, TP, PP, accumulation) therefore sees the same global batch per step, which is what makes the
single-process run an oracle for the parallel ones.
"""
from __future__ import annotations

from typing import Callable

import torch


class BatchSource:
    """Micro-batches of this data-parallel rank from a sample function ``sample(i) -> tokens[s+1]``."""

    def __init__(self, sample: Callable[[int], torch.Tensor], *, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0):
        self.sample = sample
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def next_global_batch(self) -> list[dict]:
        """This rank's micro-batches of the next optimizer step; advances the position by one step."""
        start = self.consumed_samples
        b, dp = self.micro_batch_size, self.dp_size
        micro = []
        for m in range(self.num_microbatches):
            first = start + (m * dp + self.dp_rank) * b
            micro.append(make_batch(torch.stack([self.sample(first + j) for j in range(b)])))
        self.consumed_samples += self.global_batch_size
        return micro

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def make_batch(seqs: torch.Tensor, eod: int | None = None) -> dict:
    """[b, s+1] token sequences -> the model's inputs/targets (next-token prediction)."""
    tokens = seqs[:, :-1].contiguous().long()
    labels = seqs[:, 1:].contiguous().long()
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    if eod is not None:
        loss_mask[labels == eod] = 0.0
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def synthetic_sampler(vocab_size: int, seq_length: int, seed: int) -> Callable[[int], torch.Tensor]:
    """Deterministic pseudo-text: sample i depends only on (seed, i). A repeating pattern with noise,
    so a tiny model's loss goes down (useful for demos), independent of any process's RNG."""

    def sample(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        period = int(torch.randint(2, 9, (1,), generator=g))
        motif = torch.randint(0, vocab_size, (period,), generator=g)
        seq = motif.repeat(seq_length // period + 2)[: seq_length + 1].clone()
        noise = torch.rand(seq_length + 1, generator=g) < 0.1
        seq[noise] = torch.randint(0, vocab_size, (int(noise.sum()),), generator=g)
        return seq

    return sample


def build_sources(cfg, *, vocab_size: int, dp_rank: int, dp_size: int) -> tuple[BatchSource, BatchSource | None]:
    """(train, validation) sources for this rank. Validation restarts from sample 0 at each evaluation."""
    d, p = cfg.data, cfg.parallel
    if d.source == "synthetic":
        train = synthetic_sampler(vocab_size, d.seq_length, cfg.train.seed)
        valid = synthetic_sampler(vocab_size, d.seq_length, cfg.train.seed + 1)
    else:  # indexed megatron datasets (megatron_outeff.data)
        from .indexed_data import indexed_samplers

        train, valid = indexed_samplers(cfg)
    kw = dict(micro_batch_size=p.micro_batch_size, global_batch_size=p.global_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    return BatchSource(train, **kw), (BatchSource(valid, **kw) if valid is not None else None)
