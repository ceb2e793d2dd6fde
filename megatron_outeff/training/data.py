"""The one data interface the training loop reads from.

A ``BatchSource`` yields this rank's micro-batches, each a dict of CPU tensors:
  tokens [b, s] int64, labels [b, s] int64, loss_mask [b, s] float, position_ids [b, s] int64,
and remembers how many samples the whole job has consumed (``state_dict``/``load_state_dict``), so a
resumed run continues exactly where it stopped.

Global sample order: optimizer step k consumes global samples [k*G, (k+1)*G) (G = global batch).
Micro-batch m of data-parallel rank r holds samples k*G + (m*DP + r)*b ... + b - 1. Any layout
(DP, TP, PP, accumulation) therefore sees the same global batch per step, which is what makes the
single-process run an oracle for the parallel ones. Sample i itself depends only on the data, the seed
and i, never on train.train_iters (every source is an endless stream: synthetic and bigram_backcopy
draw sample i from (seed, i), indexed data reads megatron's one-epoch datasets epoch after epoch,
``megatron_outeff.data.datasets.build_gpt_streams``), so a run extended on resume reads on where it
stopped. What defines the order is recorded with the position (``sample_order``); a resumed change of
it is refused or stated (``check_resumed_order``, ``order_change_note``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from megatron_outeff.errors import OutEffError, with_context


class BatchSource:
    """Micro-batches of this data-parallel rank from a sample function ``sample(i) -> dict`` of
    1-D tensors (tokens, labels, loss_mask, position_ids)."""

    def __init__(
        self,
        sample: Callable[[int], dict],
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        order: dict | None = None,
    ):
        self.sample = sample
        self.order = order  # what defines the stream's order (sample_order), saved with the position
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
        return {"consumed_samples": self.consumed_samples, **({"order": self.order} if self.order else {})}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def make_sample(seq: torch.Tensor) -> dict:
    """A [s+1] token sequence -> one sample's inputs/targets (next-token prediction)."""
    return {
        "tokens": seq[:-1].long(),
        "labels": seq[1:].long(),
        "loss_mask": torch.ones(seq.numel() - 1, dtype=torch.float32),
        "position_ids": torch.arange(seq.numel() - 1),
    }


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
    blend cut by data.split, or train/valid blends of their own when data.valid_paths is set. Endless
    streams (``build_gpt_streams``): nothing here depends on train.train_iters. Collective (every rank
    builds; rank 0 writes the index cache first)."""
    from megatron_outeff.data.datasets import build_gpt_streams
    from megatron_outeff.data.tokenizer import check_vocab_fits, load_tokenizer

    d, t = cfg.data, cfg.train
    if not d.tokenizer:
        raise OutEffError("data.source=indexed needs data.tokenizer")
    need_valid = bool(t.eval_interval or cfg.logging.outlier_interval)
    try:
        tokenizer = load_tokenizer(d.tokenizer)
        check_vocab_fits(tokenizer.vocab_size, vocab_size, "data.tokenizer")
        common = dict(
            tokenizer=tokenizer,
            seq_length=d.seq_length,
            seed=t.seed,
            cache_dir=d.cache_dir,
            eod_mask_loss=d.eod_mask_loss,
        )
        if d.valid_paths:
            train, valid, _ = build_gpt_streams(
                train_data=list(d.train_paths), valid_data=list(d.valid_paths) if need_valid else None, **common
            )
        else:
            train, valid, _ = build_gpt_streams(list(d.train_paths), split=d.split, **common)
        if train is None:
            raise OutEffError(f"data.split={d.split!r} gives the training split no documents")
        for stream in (train, valid if need_valid else None):
            if stream is not None:
                stream.check()  # an epoch without a sample is refused now, not at its first read
    except OutEffError as e:  # the data pipeline names the file, not the config key it came from
        raise with_context("data", e) from None

    def sampler(dataset):
        def sample(i: int) -> dict:
            x = dataset[i]
            return {
                "tokens": torch.as_tensor(x["tokens"]).long(),
                "labels": torch.as_tensor(x["labels"]).long(),
                "loss_mask": torch.as_tensor(x["loss_mask"]).float(),
                "position_ids": torch.as_tensor(x["position_ids"]).long(),
            }

        return sample

    return sampler(train), (sampler(valid) if valid is not None and need_valid else None)


def bigram_backcopy_samplers(cfg, *, vocab_size: int) -> tuple[Callable[[int], dict], Callable[[int], dict]]:
    """Training stream (seed train.seed) and the fixed held-out stream (data.bigram_backcopy.heldout_seed)."""
    from .config import bigram_backcopy_task

    task = bigram_backcopy_task(cfg)
    if task.vocab_size > vocab_size:
        raise OutEffError(
            f"data.bigram_backcopy.vocab_size={task.vocab_size} exceeds the model's vocabulary ({vocab_size})"
        )

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
    kw = dict(
        micro_batch_size=p.micro_batch_size, global_batch_size=p.global_batch_size, dp_rank=dp_rank, dp_size=dp_size
    )
    return (BatchSource(train, order=sample_order(cfg), **kw), BatchSource(valid, **kw) if valid is not None else None)


# --------------------------------------------------------------------------------------------------
# What defines the order, and a resumed change of it
# --------------------------------------------------------------------------------------------------
# Resumed changes that are refused (one line, before anything is written), and why; every other change
# of sample_order's keys is stated in one log line when the run resumes.
REFUSED_ORDER_KEYS = {
    "data.split": "it moves documents between the training and validation splits, so the validation loss "
    "would be measured on documents the run trained on"
}


def sample_order(cfg) -> dict:
    """What decides which sample the training stream holds at each position, by config key (JSON values;
    data paths resolved, blend weights and split shares normalised, so equivalent spellings are equal).
    Not in it: train.train_iters (the streams are endless), the global batch size (the stream is read on
    from the same position whatever the batch), the layout, the validation data."""
    from .model import arch_config

    d = cfg.data
    order: dict[str, Any] = {"data.source": d.source, "train.seed": cfg.train.seed, "data.seq_length": d.seq_length}
    if d.source == "synthetic":
        order["model vocabulary"] = arch_config(cfg).vocab_size  # synthetic tokens are drawn from it
    elif d.source == "bigram_backcopy":
        b = d.bigram_backcopy
        order.update(
            {f"data.bigram_backcopy.{k}": getattr(b, k) for k in ("vocab_size", "num_triggers", "seed", "logit_scale")}
        )
    else:
        from megatron.core.datasets.utils import normalize

        from megatron_outeff.data.datasets import parse_blend

        prefixes, weights = parse_blend(list(d.train_paths))
        weights = normalize(weights) if weights is not None else [None] * len(prefixes)
        order["data.train_paths"] = [[os.path.realpath(p), w] for p, w in zip(prefixes, weights)]
        order["data.split"] = None if d.valid_paths else d.split  # with valid_paths the training reads whole prefixes
    return order


def _split_shares(split):
    from megatron_outeff.data.datasets import split_shares

    return None if split is None else split_shares(split)


def order_changes(saved: dict | None, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for each key of ``sample_order`` that differs; [] when the
    checkpoint recorded no order (written before it was recorded: nothing to compare)."""
    if not saved:
        return []
    changes = []
    for key in list(current) + [k for k in saved if k not in current]:
        old, new = saved.get(key), current.get(key)
        same = _split_shares(old) == _split_shares(new) if key == "data.split" else old == new
        if not same:
            changes.append((key, old, new))
    return changes


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list) and value and isinstance(value[0], list):  # train_paths: [[path, weight], ...]
        return "[" + ", ".join(p if w is None else f"{w:g} {p}" for p, w in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def check_resumed_order(saved_data_state: dict | None, cfg) -> str | None:
    """The one-line refusal when resuming a checkpoint (its train state's "data") with a changed
    REFUSED_ORDER_KEYS key, else None (a reason to return, not raise: rank 0 decides, the others wait)."""
    try:
        current = sample_order(cfg)
    except OutEffError as e:
        return str(e)
    for key, old, new in order_changes((saved_data_state or {}).get("order"), current):
        if key in REFUSED_ORDER_KEYS:
            return (
                f"{key} changed since the checkpoint ({_show(old)} -> {_show(new)}): {REFUSED_ORDER_KEYS[key]}; "
                f"start a new run instead (checkpoint.init_from takes this run's weights)"
            )
    return None


def order_change_note(saved_data_state: dict, source: BatchSource) -> str | None:
    """The log line stating how the training stream's order changed since the checkpoint, or None."""
    changes = order_changes(saved_data_state.get("order"), source.order or {})
    if not changes:
        return None
    what = "; ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in changes)
    return (
        f"data order changed since the checkpoint ({what}): training goes on at sample {source.consumed_samples} "
        "of the new order, so it may read again samples it trained on and skip others"
    )
