"""Train/valid/test GPT datasets through megatron-core, endless sample streams over them, and a
resumable micro-batch sampler.

`build_gpt_datasets`: megatron's datasets sized for a number of samples (megatron shuffles all the
epochs it needs together, so the order depends on that number). `build_gpt_streams`: what training
reads, streams whose sample i never depends on how many samples are read (`EpochStream`,
`BlendStream`: megatron's one-epoch datasets epoch after epoch, mixed by megatron's blending rule).

Sampling (blending, splitting, shuffling, packing documents into sequences) is megatron-core's
(the streams add only the order of the epochs after the first): we only map our arguments onto
`GPTDatasetConfig` + `BlendedMegatronDatasetBuilder` and check the inputs first. Each sample is GPTDataset's dict: "tokens", "labels" (int64, [seq_length]),
"loss_mask" (float), "position_ids" and, with create_attention_mask=True, "attention_mask"
(bool [1, seq, seq], True = masked out).

torch.distributed (megatron-core 0.16.1 behaviour): `build()` is collective when a process group
exists -- every rank must call it. For each dataset, rank 0 builds (and writes the index cache)
first, all ranks meet at a barrier, then the other ranks build and hit the cache. So the cache
directory must be visible to all ranks (shared filesystem, or per-node caches with one build per
node). Ranks whose `is_built_on_rank()` returns False still join the barriers but get None.
Our input checks run on every rank before the builder: a bad prefix fails everywhere at once
instead of rank 0 raising while the others wait in a barrier forever.
Without a process group everything is built in-process; see `_no_process_group_get_rank` for the
one megatron code path that needs help there.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_outeff.errors import OutEffError

from .tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

# Our adapters are duck-typed (tokenizer.py avoids importing megatron.core); register them so
# isinstance(tok, MegatronTokenizerBase) holds wherever megatron or callers check it.
MegatronTokenizerBase.register(SentencePieceTokenizer)
MegatronTokenizerBase.register(HFTokenizer)

Blend = Tuple[List[str], Optional[List[float]]]
BlendSpec = Union[str, Sequence[Union[str, float]], Blend]


def parse_blend(spec: BlendSpec, weights: Optional[Sequence[float]] = None) -> Blend:
    """Normalise a data spec to megatron's (prefixes, weights-or-None).

    Accepts a prefix, a list of prefixes, megatron's "--data-path" style alternating list
    ["0.7", "a", "0.3", "b"] (or the same as one whitespace-separated string), or a ready
    (prefixes, weights) tuple. `weights` may be given separately for a plain prefix list.
    """
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (list, tuple)):
        prefixes, w = list(spec[0]), spec[1]
        weights = list(w) if w is not None else weights
    else:
        items = spec.split() if isinstance(spec, str) else [str(s) for s in spec]
        if not items:
            raise OutEffError("empty data spec")

        def is_number(s: str) -> bool:
            try:
                float(s)
                return True
            except ValueError:
                return False

        if len(items) % 2 == 0 and all(is_number(x) for x in items[0::2]):
            if weights is not None:
                raise OutEffError("weights given twice (in the data spec and as weights=)")
            weights = [float(x) for x in items[0::2]]
            prefixes = items[1::2]
        else:
            prefixes = items
    if weights is not None:
        weights = [float(x) for x in weights]
        if len(weights) != len(prefixes):
            raise OutEffError(f"{len(weights)} weights for {len(prefixes)} prefixes")
        if any(x < 0 for x in weights) or sum(weights) <= 0:
            raise OutEffError(f"blend weights must be >= 0 with a positive sum, got {weights}")
    return list(prefixes), weights


def check_indexed_dataset(
    prefix: str, tokenizer: Optional[Tokenizer] = None, sample_documents: int = 64
) -> Dict[str, Any]:
    """Cheap sanity check of one PREFIX.bin/.idx pair; raises OutEffError naming the prefix.

    Checks both files exist, the index is readable and non-empty, and (with a tokenizer) that the
    token ids of up to `sample_documents` documents spread over the dataset are < vocab_size:
    a dataset made with a larger tokenizer would otherwise index past the embedding table.
    Returns {"documents", "tokens", "dtype", "max_sampled_id"}.
    """
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise OutEffError(f"dataset prefix {prefix!r}: missing {' and '.join(missing)}")
    ds = IndexedDataset.__new__(IndexedDataset)
    try:
        ds.__init__(prefix, mmap=True)
    except Exception as e:  # truncated / foreign .idx: megatron asserts with a terse message
        # the half-built object's __del__ deletes attributes __init__ never set: give them, so that
        # nothing but our one line reaches stderr
        ds.__dict__.setdefault("bin_reader", None)
        ds.__dict__.setdefault("index", None)
        raise OutEffError(f"dataset prefix {prefix!r}: unreadable index ({e})") from None
    n = len(ds)
    if n == 0:
        raise OutEffError(f"dataset prefix {prefix!r}: holds no documents")
    dtype = numpy.dtype(ds.index.dtype)
    docs = numpy.unique(numpy.linspace(0, n - 1, num=min(n, sample_documents)).astype(numpy.int64))
    sampled = [ds[int(i)] for i in docs]
    max_id = max(int(d.max(initial=0)) for d in sampled)
    if tokenizer is not None and max_id >= tokenizer.vocab_size:
        raise OutEffError(
            f"dataset prefix {prefix!r} holds token id {max_id} but the tokenizer's vocab size is "
            f"{tokenizer.vocab_size}: it was preprocessed with a different tokenizer"
        )
    if tokenizer is not None and not all(d.size and int(d[-1]) == tokenizer.eod for d in sampled):
        # Not fatal (data from other tools may lack eods), but GPTDataset's eod-based masks and
        # position resets would silently do nothing, and it often means a tokenizer mismatch.
        warnings.warn(
            f"dataset prefix {prefix!r}: sampled documents do not end with the "
            f"tokenizer's eod id {tokenizer.eod} (other tokenizer, or no eod appended)",
            stacklevel=2,
        )
    return {
        "documents": n,
        "tokens": int(ds.sequence_lengths.sum(dtype=numpy.int64)),
        "dtype": dtype.name,
        "max_sampled_id": max_id,
    }


_SPLIT_NAMES = ("train", "valid", "test")


def split_shares(split: str, name: str = "split") -> List[float]:
    """The normalised (train, valid, test) shares of a split string such as "969,30,1" (1 to 3
    comma-separated non-negative numbers with a positive sum; missing shares are 0), as megatron-core
    parses it; OutEffError ``<name>=<split>: ...`` otherwise."""
    parts = [p.strip() for p in str(split).split(",")]
    if not (
        1 <= len(parts) <= 3
        and all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts)
        and any(float(p) > 0 for p in parts)
    ):
        raise OutEffError(
            f"{name}={split!r}: expected up to three comma-separated shares (train, valid, test) "
            f"with a positive sum, e.g. '969,30,1'"
        )
    return parse_and_normalize_split(split)


def _check_split_ranges(split: str, stats: Dict[str, Dict[str, Any]]) -> None:
    """Every split with a positive share must get >= 1 document of every prefix.

    megatron-core 0.16.1 cuts each prefix's documents into contiguous ranges by the split
    string (round(share * n_documents) bookends). An empty range with a non-None sample count
    makes GPTDataset._get_num_epochs loop forever (it adds 0-token epochs until it has enough
    tokens), so a tiny dataset with split "969,30,1" would hang instead of failing.
    """
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix, st in stats.items():
        n = st["documents"]
        for name, bookends in zip(_SPLIT_NAMES, matrix):
            if bookends is None:
                continue
            beg, end = int(round(bookends[0] * n)), int(round(bookends[1] * n))
            if end <= beg:
                raise OutEffError(
                    f"split {split!r} gives the {name} split 0 of the {n} documents of "
                    f"{prefix!r}: use more documents, a larger {name} share, or a 0 share"
                )


@contextlib.contextmanager
def _no_process_group_get_rank():
    """Let megatron-core 0.16.1's BlendedDataset build without a process group.

    BlendedDataset._build_indices calls `torch.distributed.get_rank()` unguarded when a cache
    directory is set and the cache misses, which raises "Default process group has not been
    initialized" in a single process (GPTDataset guards the same call with is_initialized()).
    Without a process group this process is the only rank, so rank 0 is the truth; the patch is
    only applied in that case and undone right after the build.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    original = torch.distributed.get_rank
    torch.distributed.get_rank = lambda *a, **k: 0
    try:
        yield
    finally:
        torch.distributed.get_rank = original


def _check_blend_source(data, weights, per_split_data) -> None:
    """One-line OutEffError unless exactly one of ``data`` (one blend cut by ``split``) and the per-split
    blends (train, valid, test) is given, and ``weights`` only with ``data``."""
    if (data is None) == all(d is None for d in per_split_data):
        raise OutEffError("pass either data (with split) or train_data/valid_data/test_data")
    if data is None and weights is not None:
        raise OutEffError("weights= applies to data=; put weights inside each per-split spec")


def build_gpt_datasets(
    data: Optional[BlendSpec] = None,
    *,
    tokenizer: Tokenizer,
    seq_length: int,
    num_samples: Sequence[Optional[int]] = (None, None, None),
    split: str = "969,30,1",
    weights: Optional[Sequence[float]] = None,
    train_data: Optional[BlendSpec] = None,
    valid_data: Optional[BlendSpec] = None,
    test_data: Optional[BlendSpec] = None,
    seed: int = 1234,
    cache_dir: Optional[str] = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = False,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    mid_level_dataset_surplus: float = 0.005,
    num_dataset_builder_threads: int = 1,
) -> Tuple[Optional[GPTDataset], Optional[GPTDataset], Optional[GPTDataset]]:
    """Build (train, valid, test) datasets with megatron-core's BlendedMegatronDatasetBuilder.

    Either `data` (one blend, cut into train/valid/test by document ranges per `split`, e.g.
    "969,30,1"; see `parse_blend` for the accepted forms, or pass `weights=`) or
    `train_data`/`valid_data`/`test_data` (a separate blend per split, no `split`).
    `num_samples`: samples per split (train, valid, test); None = one pass over that split's
    documents (only without weights: a weighted blend needs a size). A plain GPTDataset holds
    whole epochs, so its len() may exceed the request (take the first N); a blended split has
    exactly the requested length. For a weighted blend each
    split is a megatron BlendedDataset drawing from the prefixes in proportion to the weights.
    `cache_dir`: where megatron caches the document/sample/shuffle indices (default:
    `<dir of the first prefix>/index_cache`); must be shared by all ranks.
    `create_attention_mask`: False by default, since the model builds its causal mask itself
    and a dense [seq, seq] mask per sample is large.
    `is_built_on_rank`: megatron's hook (default: every rank builds); see the module doc.
    A split with zero share or no data is None. Datasets yield GPTDataset sample dicts.
    """
    _check_blend_source(data, weights, (train_data, valid_data, test_data))
    if len(num_samples) != 3:
        raise OutEffError(f"num_samples must have 3 entries (train, valid, test), got {num_samples}")
    if seq_length < 1:
        raise OutEffError(f"seq_length must be >= 1, got {seq_length}")

    if data is not None:
        blends: List[Optional[Blend]] = [parse_blend(data, weights)]
        blend, blend_per_split = blends[0], None
        split_shares(split)  # well-formed, with a positive share
    else:
        blends = [parse_blend(d) if d is not None else None for d in (train_data, valid_data, test_data)]
        blend, blend_per_split, split = None, blends, None

    # A one-prefix "blend" needs no weights (megatron would build a pointless BlendedDataset).
    blends = [(b[0], None) if b is not None and len(b[0]) == 1 else b for b in blends]
    if blend_per_split is None:
        blend = blends[0]
    else:
        blend_per_split = blends
    for b, size in zip(blends if blend_per_split else blends * 3, num_samples):
        if b is not None and b[1] is not None and size is None:
            raise OutEffError("a weighted blend needs num_samples for every split it feeds")
    prefixes = [p for b in blends if b is not None for p in b[0]]
    stats = {prefix: check_indexed_dataset(prefix, tokenizer) for prefix in dict.fromkeys(prefixes)}
    if blend is not None:
        _check_split_ranges(split, stats)

    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index_cache")
    os.makedirs(cache_dir, exist_ok=True)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        mid_level_dataset_surplus=mid_level_dataset_surplus,
        num_dataset_builder_threads=num_dataset_builder_threads,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), config)
    with _no_process_group_get_rank():
        train, valid, test = builder.build()
    return train, valid, test


# --------------------------------------------------------------------------------------------------
# Sample streams: sample i depends on the data, the seed and i, never on a run's length
# --------------------------------------------------------------------------------------------------
class EpochStream:
    """Sample i (any i >= 0) of the endless sequence of epochs of one megatron dataset.

    ``dataset`` holds exactly one epoch of L samples (a GPTDataset built with num_samples=None:
    megatron's document shuffle, packing into sequences and sample shuffle, seeded by its config's
    random_seed). Epoch e = i // L reads those L samples once each: epoch 0 in megatron's own order
    (the order megatron gives any run that fits in one epoch), epoch e >= 1 in a permutation of it
    drawn by numpy's RandomState (whose streams numpy keeps fixed across versions) from
    SeedSequence((seed, e)). Documents are packed into sequences once; a later epoch re-reads the
    same sequences in a new order. Why not megatron's own multi-epoch dataset: it shuffles all of its
    epochs together, so its order depends on how many samples were asked for, and a run extended on
    resume would re-read samples it trained on and skip others.
    """

    def __init__(self, dataset, seed: int, name: str):
        self.dataset = dataset
        self.seed = int(seed)
        self.name = name
        self.epoch_length = len(dataset)
        self._epoch, self._permutation = None, None  # the last epoch read (reads are in order per rank)

    def permutation(self, epoch: int) -> numpy.ndarray:
        """Epoch ``epoch``'s order: positions into the one-epoch dataset (epoch 0: the identity)."""
        if epoch == 0:
            return numpy.arange(self.epoch_length)
        if epoch != self._epoch:
            entropy = numpy.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]
            order = numpy.arange(self.epoch_length, dtype=numpy.uint32 if self.epoch_length < 2**32 else numpy.int64)
            numpy.random.RandomState(entropy).shuffle(order)  # megatron's shuffle index is built the same way
            self._epoch, self._permutation = epoch, order
        return self._permutation

    def check(self) -> None:
        """OutEffError naming the split and prefix when an epoch holds no sample."""
        if self.epoch_length < 1:
            raise OutEffError(f"{self.name} holds no sample: fewer tokens than one sequence")

    def __getitem__(self, i: int) -> Dict[str, Any]:
        self.check()
        epoch, j = divmod(int(i), self.epoch_length)
        return self.dataset[int(self.permutation(epoch)[j]) if epoch else j]


class BlendStream:
    """Sample i of a weighted blend of streams, by megatron's BlendedDataset rule
    (``helpers.build_blending_indices``: sample i comes from the stream furthest below its share,
    and is that stream's next sample). The rule looks only at the samples before i, so the index
    is computed for as many samples as have been asked for and grown (recomputed, twice as long)
    on demand: sample i never depends on how many samples a run reads. Samples carry "dataset_id"
    (the position of their prefix in the blend), as megatron's do."""

    def __init__(self, streams: Sequence[EpochStream], weights: Sequence[float], dataset_ids: Sequence[int]):
        from megatron.core.datasets.utils import normalize

        self.streams = list(streams)
        self.weights = numpy.asarray(normalize(list(weights)), dtype=numpy.float64)
        self.dataset_ids = list(dataset_ids)
        self._dataset_index = numpy.zeros(0, dtype=numpy.int16)
        self._sample_index = numpy.zeros(0, dtype=numpy.int64)

    def check(self) -> None:
        for stream in self.streams:
            stream.check()

    def _grow(self, size: int) -> None:
        from megatron.core.datasets import helpers

        size = max(size, 2 * len(self._dataset_index), 1024)
        dataset_index = numpy.zeros(size, dtype=numpy.int16)
        sample_index = numpy.zeros(size, dtype=numpy.int64)
        helpers.build_blending_indices(dataset_index, sample_index, self.weights, len(self.streams), size, False)
        self._dataset_index, self._sample_index = dataset_index, sample_index

    def __getitem__(self, i: int) -> Dict[str, Any]:
        i = int(i)
        if i >= len(self._dataset_index):
            self._grow(i + 1)
        d = int(self._dataset_index[i])
        return {"dataset_id": self.dataset_ids[d], **self.streams[d][int(self._sample_index[i])]}


def build_gpt_streams(
    data: Optional[BlendSpec] = None,
    *,
    weights: Optional[Sequence[float]] = None,
    train_data: Optional[BlendSpec] = None,
    valid_data: Optional[BlendSpec] = None,
    test_data: Optional[BlendSpec] = None,
    seed: int = 1234,
    **dataset_options,
) -> Tuple[Any, Any, Any]:
    """(train, valid, test) endless sample streams (``stream[i]``: GPTDataset's sample dict; None
    for a split without data), whose order does not depend on how many samples are read.

    The arguments are ``build_gpt_datasets``'s, without num_samples (``dataset_options``, passed on to it:
    tokenizer, seq_length, split, cache_dir, eod_mask_loss, reset_position_ids, reset_attention_mask,
    create_attention_mask, is_built_on_rank). Each
    prefix's splits are built once, one epoch each, by megatron (``build_gpt_datasets`` with
    num_samples=None: the documents of a prefix are cut by ``split`` exactly as megatron cuts a
    blend); each becomes an ``EpochStream``; several prefixes are mixed by a ``BlendStream`` with
    the blend's weights, or without weights in proportion to their samples per epoch (megatron's
    rule for an unweighted blend). A prefix with weight 0 is left out. Within the first epoch of
    every prefix the samples are exactly those of ``build_gpt_datasets`` sized for that many
    samples. Collective like ``build_gpt_datasets`` (one build per prefix, in blend order).
    """
    _check_blend_source(data, weights, (train_data, valid_data, test_data))
    common = dict(seed=seed, num_samples=(None, None, None), **dataset_options)
    if data is not None:
        prefixes, blend_weights = parse_blend(data, weights)
        built = [build_gpt_datasets(([p], None), **common) for p in prefixes]  # (train, valid, test) per prefix
        per_split = [(prefixes, blend_weights, [b[k] for b in built]) for k in range(3)]
    else:
        per_split = []
        for k, (name, spec) in enumerate(zip(_SPLIT_NAMES, (train_data, valid_data, test_data))):
            if spec is None:
                per_split.append(None)
                continue
            prefixes, blend_weights = parse_blend(spec)
            per_split.append(
                (
                    prefixes,
                    blend_weights,
                    [build_gpt_datasets(**{f"{name}_data": ([p], None)}, **common)[k] for p in prefixes],
                )
            )

    streams = []
    for k, entry in enumerate(per_split):
        if entry is None or all(ds is None for ds in entry[2]):
            streams.append(None)
            continue
        prefixes, blend_weights, datasets = entry
        parts = [
            (i, EpochStream(ds, seed, f"the {_SPLIT_NAMES[k]} split of {p!r}"))
            for i, (p, ds) in enumerate(zip(prefixes, datasets))
            if ds is not None
        ]
        shares = [blend_weights[i] if blend_weights is not None else s.epoch_length for i, s in parts]
        drawn = [(i, s, w) for (i, s), w in zip(parts, shares) if w > 0]
        if len(drawn) == 1 or not drawn:  # one source: the plain stream (none: reading it says why)
            streams.append((drawn or parts)[0][1])
        else:
            streams.append(BlendStream([s for _, s, _ in drawn], [w for _, _, w in drawn], [i for i, _, _ in drawn]))
    return tuple(streams)


class ResumableBatchSampler:
    """Micro-batches of dataset indices in order, resumable from a consumed-sample count.

    Megatron-style: one step consumes a global batch of micro_batch_size * data_parallel_size
    consecutive indices (the datasets are already shuffled by megatron), of which this rank
    takes its contiguous slice. `state_dict()` is {"consumed_samples": n} (global count), so a
    checkpoint taken on one data-parallel size resumes at the same sample on another.
    `loop=True` wraps around (epoch after epoch, same order); otherwise iteration stops before a
    global batch that would run past `total_samples`.

    The state counts batches *yielded by this sampler*. Used directly (MicroBatchIterator) that
    is what training consumed; behind a torch DataLoader with workers/prefetch the sampler runs
    ahead, so there save the trainer's own consumed-sample count and pass it as
    `consumed_samples` (or to load_state_dict) on resume.
    """

    def __init__(
        self,
        total_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
        loop: bool = False,
    ):
        if total_samples < 1:
            raise OutEffError(f"dataset is empty (total_samples={total_samples})")
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise OutEffError("micro_batch_size and data_parallel_size must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise OutEffError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.global_batch = micro_batch_size * data_parallel_size
        if not loop and self.global_batch > total_samples:
            raise OutEffError(f"global batch {self.global_batch} > dataset size {total_samples}")
        self.loop = loop
        self.consumed_samples = int(consumed_samples)

    def __len__(self) -> int:
        """Batches left (not defined with loop=True)."""
        if self.loop:
            raise TypeError("a looping sampler has no length")
        return max(0, (self.total_samples - self.consumed_samples) // self.global_batch)

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            start = self.consumed_samples
            if not self.loop and start + self.global_batch > self.total_samples:
                return
            first = start + self.data_parallel_rank * self.micro_batch_size
            batch = [(first + j) % self.total_samples for j in range(self.micro_batch_size)]
            self.consumed_samples += self.global_batch
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def collate_samples(samples: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Stack a list of GPTDataset sample dicts into a batch dict (leading batch dimension)."""
    out = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        vals = [torch.as_tensor(v) for v in vals]
        out[key] = torch.stack(vals)
    return out


class MicroBatchIterator:
    """Iterates collated micro-batches of `dataset` in the order of a ResumableBatchSampler.

    Single-process (no DataLoader workers), so its state is exactly what training consumed:
        it = MicroBatchIterator(train_ds, micro_batch_size=4)
        batch = next(it)               # {"tokens": [4, seq], "labels": ..., ...}
        ckpt["data"] = it.state_dict() # later: it.load_state_dict(ckpt["data"])
    """

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
        loop: bool = False,
    ):
        self.dataset = dataset
        self.sampler = ResumableBatchSampler(
            len(dataset), micro_batch_size, data_parallel_rank, data_parallel_size, consumed_samples, loop
        )
        self._it: Optional[Iterator[List[int]]] = None

    def __iter__(self) -> "MicroBatchIterator":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.sampler)
        indices = next(self._it)
        return collate_samples([self.dataset[i] for i in indices])

    @property
    def consumed_samples(self) -> int:
        return self.sampler.consumed_samples

    def state_dict(self) -> Dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
        self._it = None
