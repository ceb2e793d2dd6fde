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

from megatron_outeff.errors import OutEffError, with_context


class BatchSource:
    """Micro-batches of this data-parallel rank from a sample function ``sample(i) -> dict`` of
    1-D tensors (tokens, labels, loss_mask, position_ids)."""

    def __init__(self, sample: Callable[[int], dict], *, micro_batch_size: int, global_batch_size: int,
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
            samples = [self.sample(first + j) for j in range(b)]
            micro.append({k: torch.stack([x[k] for x in samples]) for k in BATCH_KEYS})
        self.consumed_samples += self.global_batch_size
        return micro

    def first_microbatch(self) -> dict:
        """This rank's first micro-batch of the stream (position unchanged)."""
        saved = self.consumed_samples
        self.consumed_samples = 0
        try:
            return self.next_global_batch()[0]
        finally:
            self.consumed_samples = saved

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def make_sample(seq: torch.Tensor) -> dict:
    """A [s+1] token sequence -> one sample's inputs/targets (next-token prediction)."""
    return {"tokens": seq[:-1].long(), "labels": seq[1:].long(),
            "loss_mask": torch.ones(seq.numel() - 1, dtype=torch.float32),
            "position_ids": torch.arange(seq.numel() - 1)}


def synthetic_sampler(vocab_size: int, seq_length: int, seed: int) -> Callable[[int], dict]:
    """Deterministic pseudo-text: sample i depends only on (seed, i). A repeating pattern with noise,
    so a tiny model's loss goes down (useful for demos), independent of any process's RNG."""

    def sample(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        period = int(torch.randint(2, 9, (1,), generator=g))
        motif = torch.randint(0, vocab_size, (period,), generator=g)
        seq = motif.repeat(seq_length // period + 2)[: seq_length + 1].clone()
        noise = torch.rand(seq_length + 1, generator=g) < 0.1
        seq[noise] = torch.randint(0, vocab_size, (int(noise.sum()),), generator=g)
        return make_sample(seq)

    return sample


def indexed_samplers(cfg, *, vocab_size: int) -> tuple[Callable[[int], dict], Callable[[int], dict] | None]:
    """Sample functions over megatron GPTDatasets (megatron_outeff.data): data.train_paths as one
    blend cut by data.split, or train/valid blends of their own when data.valid_paths is set.
    Collective (every rank builds; rank 0 writes the index cache first)."""
    from megatron_outeff.data.datasets import build_gpt_datasets
    from megatron_outeff.data.tokenizer import check_vocab_fits, load_tokenizer

    d, t, p = cfg.data, cfg.train, cfg.parallel
    if not d.tokenizer:
        raise OutEffError("data.source=indexed needs data.tokenizer")
    n_train = t.train_iters * p.global_batch_size
    n_valid = t.eval_iters * p.global_batch_size if (t.eval_interval or cfg.logging.outlier_interval) else 0
    try:
        tokenizer = load_tokenizer(d.tokenizer)
        check_vocab_fits(tokenizer.vocab_size, vocab_size, "data.tokenizer")
        common = dict(tokenizer=tokenizer, seq_length=d.seq_length, seed=t.seed, cache_dir=d.cache_dir,
                      eod_mask_loss=d.eod_mask_loss)
        if d.valid_paths:
            train, valid, _ = build_gpt_datasets(train_data=list(d.train_paths), valid_data=list(d.valid_paths),
                                                 num_samples=(n_train, max(n_valid, 1), None), **common)
        else:
            train, valid, _ = build_gpt_datasets(list(d.train_paths), split=d.split,
                                                 num_samples=(n_train, max(n_valid, 1), None), **common)
    except OutEffError as e:  # the data pipeline names the file, not the config key it came from
        raise with_context("data", e) from None
    if train is None or len(train) < n_train:
        raise OutEffError(f"data: the training split holds {0 if train is None else len(train)} samples, "
                          f"{n_train} needed (train_iters x global_batch_size)")

    def sampler(dataset):
        def sample(i: int) -> dict:
            x = dataset[i]
            return {"tokens": torch.as_tensor(x["tokens"]).long(), "labels": torch.as_tensor(x["labels"]).long(),
                    "loss_mask": torch.as_tensor(x["loss_mask"]).float(),
                    "position_ids": torch.as_tensor(x["position_ids"]).long()}
        return sample

    return sampler(train), (sampler(valid) if valid is not None and n_valid else None)


def bigram_backcopy_samplers(cfg, *, vocab_size: int) -> tuple[Callable[[int], dict], Callable[[int], dict]]:
    """Training stream (seed train.seed) and the fixed held-out stream (data.bigram_backcopy.heldout_seed)."""
    from .config import bigram_backcopy_task

    task = bigram_backcopy_task(cfg)
    if task.vocab_size > vocab_size:
        raise OutEffError(f"data.bigram_backcopy.vocab_size={task.vocab_size} exceeds the model's vocabulary ({vocab_size})")

    def sampler(stream_seed: int):
        return lambda i: make_sample(task.sequence(stream_seed, i))

    return sampler(cfg.train.seed), sampler(cfg.data.bigram_backcopy.heldout_seed)


def build_sources(cfg, *, vocab_size: int, dp_rank: int, dp_size: int) -> tuple[BatchSource, BatchSource | None]:
    """(train, validation) sources for this rank. Validation restarts from sample 0 at each evaluation."""
    d, p = cfg.data, cfg.parallel
    if d.source == "synthetic":
        train = synthetic_sampler(vocab_size, d.seq_length, cfg.train.seed)
        valid = synthetic_sampler(vocab_size, d.seq_length, cfg.train.seed + 1)
    elif d.source == "bigram_backcopy":
        train, valid = bigram_backcopy_samplers(cfg, vocab_size=vocab_size)
    else:
        train, valid = indexed_samplers(cfg, vocab_size=vocab_size)
    kw = dict(micro_batch_size=p.micro_batch_size, global_batch_size=p.global_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    return BatchSource(train, **kw), (BatchSource(valid, **kw) if valid is not None else None)
