"""Evaluation and calibration token blocks from a megatron indexed dataset or from raw text files.

    load_token_stream(source, tokenizer=None, *, json_key="text", txt_mode="file", max_tokens=None)
        -> (ids: 1-D int64 tensor, description: dict)
    eval_blocks(source, tokenizer=None, *, block_size=512, max_blocks=None, vocab_size=None, ...)
        -> EvalData(blocks [n, block_size] LongTensor, description)
    calibration_batches(source, tokenizer=None, *, num_batches=4, batch_size=8, block_size=512, ...)
        -> EvalData whose .batches is a list of [batch_size, block_size] LongTensors
    check_data_source(source, what)        a source that names nothing is refused before any work
    tokenizer_for(tokenizer, model_dirs)   the tokenizer to use: the given one, else the first model
                                           directory holding tokenizer files, else None
    add_data_arguments(parser)             the data flags the evaluation tools share (--tokenizer,
                                           --json-key, --block-size, --num-calib-batches, --calib-batch-size)

`source` is either
  (a) a megatron indexed dataset PREFIX (PREFIX.bin + PREFIX.idx exist): documents are read in
      index order with megatron-core's IndexedDataset (already tokenized, eod included); with a
      tokenizer its vocabulary is checked against the data first (`check_indexed_dataset`);
  (b) paths / globs of raw .txt / .jsonl files (the data pipeline's `iter_documents`): each document
      is tokenized with `tokenizer` (required) and followed by the tokenizer's eod token, as the
      preprocessing pipeline does.
The documents are concatenated into one stream and cut into consecutive non-overlapping blocks of
`block_size` tokens; a trailing partial block is dropped (every block has the same length). A stream
shorter than one block is an error. Blocks are independent in perplexity (no context carried across).

The paper calibrates on 4 batches of 8 x 512 tokens of TRAINING data and evaluates on held-out data:
pass a training source to calibration_batches and a validation source to eval_blocks. If there are
fewer blocks than num_batches * batch_size, fewer (or smaller) batches are returned and the
description says so ("requested" vs "got").
All errors are one-line OutEffErrors (megatron_outeff.errors) naming the bad input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy
import torch

from megatron_outeff.errors import OutEffError, with_context

__all__ = [
    "EvalData",
    "add_data_arguments",
    "calibration_batches",
    "check_data_source",
    "eval_blocks",
    "is_indexed_prefix",
    "load_token_stream",
    "tokenizer_for",
]

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


@dataclass
class EvalData:
    """Fixed-length token blocks and a JSON-able description of where they came from."""

    blocks: torch.Tensor  # [n, block_size] int64
    description: dict = field(default_factory=dict)
    batches: list = field(default_factory=list)  # calibration_batches only: [b, block_size] tensors

    @property
    def num_tokens(self) -> int:
        return int(self.blocks.numel())


def _as_list(source: Source) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        return [os.fspath(source)]
    return [os.fspath(s) for s in source]


def is_indexed_prefix(source: Source) -> bool:
    """True if source is a single megatron indexed dataset prefix (PREFIX.bin or PREFIX.idx exists)."""
    srcs = _as_list(source)
    return len(srcs) == 1 and (os.path.isfile(srcs[0] + ".bin") or os.path.isfile(srcs[0] + ".idx"))


def check_data_source(source: str, what: str) -> None:
    """OutEffError naming ``what`` if ``source`` is not an indexed dataset prefix, an existing file, or a
    glob that matches files."""
    if is_indexed_prefix(source):
        return
    import glob

    from megatron_outeff.data.corpus import expand_input

    if not os.path.exists(source) and not glob.has_magic(source):
        raise OutEffError(
            f"{what} not found: {source} (expected a .txt/.jsonl file, a glob, or an indexed dataset prefix)"
        )
    try:
        expand_input(source)  # the inputs' one rule: an existing file is literal, even named data[1].jsonl
    except OutEffError as e:
        raise with_context(what, e) from None


def tokenizer_for(tokenizer: Optional[str], model_dirs: Sequence[str]) -> Optional[str]:
    """The tokenizer path to use: ``tokenizer`` (OutEffError if missing), else the first model directory
    holding tokenizer.json / tokenizer.model, else None (fine for indexed data without a vocab check)."""
    if tokenizer:
        if not os.path.exists(tokenizer):
            raise OutEffError(f"tokenizer not found: {tokenizer}")
        return tokenizer
    for d in model_dirs:
        if any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer.model")):
            return str(d)
    return None


def add_data_arguments(parser) -> None:
    """The data flags of the evaluation tools (tools/export_fp16_w8a8.py, tools/outlier_report.py)."""
    from megatron_outeff.utils.cli import positive_int

    parser.add_argument(
        "--tokenizer",
        help="tokenizer file/dir for raw text data and the vocab check (default: the "
        "first model directory, if it holds tokenizer.json / *.model)",
    )
    parser.add_argument("--json-key", default="text", help="JSONL key holding the text (default: text)")
    parser.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        help="tokens per block (default 512, the paper's, or the model's max_position_embeddings if smaller)",
    )
    parser.add_argument("--num-calib-batches", type=positive_int, default=4, help="calibration batches (paper: 4)")
    parser.add_argument(
        "--calib-batch-size", type=positive_int, default=8, help="blocks per calibration batch (paper: 8)"
    )


def _load_tok(tokenizer):
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from megatron_outeff.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer)


def load_token_stream(
    source: Source, tokenizer=None, *, json_key: str = "text", txt_mode: str = "file", max_tokens: Optional[int] = None
) -> tuple[torch.Tensor, dict]:
    """The concatenated token ids (1-D int64 tensor) of all documents of `source` (see the module doc), stopping once
    `max_tokens` are read; and a description {"kind", "source", "documents", "tokens", ...}.
    `tokenizer`: a loaded megatron_outeff Tokenizer or a path for `load_tokenizer`."""
    srcs = _as_list(source)
    if not srcs:
        raise OutEffError("no evaluation data given")
    tok = _load_tok(tokenizer)
    ids: list[int] = []
    n_docs = 0
    if is_indexed_prefix(srcs):
        from megatron.core.datasets.indexed_dataset import IndexedDataset  # ~5 s import: only here

        from megatron_outeff.data.datasets import check_indexed_dataset

        prefix = srcs[0]
        stats = check_indexed_dataset(prefix, tok)
        ds = IndexedDataset(prefix, mmap=True)
        chunks, n_tok = [], 0
        for i in range(len(ds)):
            chunks.append(numpy.asarray(ds[i], dtype=numpy.int64))
            n_tok += chunks[-1].size
            n_docs += 1
            if max_tokens is not None and n_tok >= max_tokens:
                break
        ids = numpy.concatenate(chunks) if chunks else numpy.zeros(0, dtype=numpy.int64)
        desc = {
            "kind": "megatron_indexed",
            "source": os.path.abspath(prefix),
            "dataset_documents": stats["documents"],
            "dataset_tokens": stats["tokens"],
        }
    else:
        from megatron_outeff.data.corpus import iter_documents

        if tok is None:
            raise OutEffError(f"raw text data {srcs} needs a tokenizer (--tokenizer, or a model directory holding one)")
        for doc in iter_documents(srcs, json_key=json_key, txt_mode=txt_mode):
            ids.extend(tok.encode(doc))
            ids.append(tok.eod)
            n_docs += 1
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        desc = {
            "kind": "text",
            "source": [os.path.abspath(s) for s in srcs],
            "json_key": json_key,
            "txt_mode": txt_mode,
        }
    if tok is not None:
        desc["tokenizer"] = os.path.abspath(tok.path) if getattr(tok, "path", None) else repr(tok)
    ids = torch.as_tensor(numpy.asarray(ids, dtype=numpy.int64))
    desc.update(documents_read=n_docs, tokens_read=int(ids.numel()))
    return ids, desc


def _cut(ids: torch.Tensor, block_size: int, max_blocks: Optional[int], what: str, desc: dict) -> torch.Tensor:
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise OutEffError(f"{what}: {desc['source']} holds {len(ids)} tokens, fewer than one block of {block_size}")
    return ids[: n * block_size].clone().view(n, block_size)


def _check_args(block_size, **counts):
    if not isinstance(block_size, int) or block_size < 2:
        raise OutEffError(f"block size must be an int >= 2, got {block_size!r}")
    for name, v in counts.items():
        if v is not None and (not isinstance(v, int) or v < 1):
            raise OutEffError(f"{name} must be a positive int, got {v!r}")


def _check_vocab(blocks: torch.Tensor, vocab_size: Optional[int], desc: dict):
    if vocab_size is not None and blocks.numel():
        top = int(blocks.max())
        if top >= vocab_size:
            raise OutEffError(
                f"data {desc['source']} holds token id {top} but the model's vocab size is {vocab_size}: "
                "tokenized with a different tokenizer"
            )


def eval_blocks(
    source: Source,
    tokenizer=None,
    *,
    block_size: int = 512,
    max_blocks: Optional[int] = None,
    vocab_size: Optional[int] = None,
    json_key: str = "text",
    txt_mode: str = "file",
) -> EvalData:
    """Evaluation blocks [n, block_size] (n <= max_blocks) from `source`; see the module doc.
    `vocab_size`: the model's; a token id >= it is refused."""
    _check_args(block_size, max_blocks=max_blocks)
    max_tokens = None if max_blocks is None else max_blocks * block_size
    ids, desc = load_token_stream(source, tokenizer, json_key=json_key, txt_mode=txt_mode, max_tokens=max_tokens)
    blocks = _cut(ids, block_size, max_blocks, "evaluation data", desc)
    _check_vocab(blocks, vocab_size, desc)
    desc.update(block_size=block_size, max_blocks=max_blocks, blocks=int(blocks.shape[0]), tokens=int(blocks.numel()))
    return EvalData(blocks=blocks, description=desc)


def calibration_batches(
    source: Source,
    tokenizer=None,
    *,
    num_batches: int = 4,
    batch_size: int = 8,
    block_size: int = 512,
    vocab_size: Optional[int] = None,
    json_key: str = "text",
    txt_mode: str = "file",
) -> EvalData:
    """Calibration batches: the first num_batches * batch_size blocks of `source`, batched.
    The paper: 4 batches of 8 x 512 tokens of training data."""
    _check_args(block_size, num_batches=num_batches, batch_size=batch_size)
    want = num_batches * batch_size
    ids, desc = load_token_stream(source, tokenizer, json_key=json_key, txt_mode=txt_mode, max_tokens=want * block_size)
    blocks = _cut(ids, block_size, want, "calibration data", desc)
    _check_vocab(blocks, vocab_size, desc)
    batches = list(blocks.split(batch_size))
    desc.update(
        block_size=block_size,
        requested_batches=num_batches,
        requested_batch_size=batch_size,
        batches=len(batches),
        batch_sizes=[int(b.shape[0]) for b in batches],
        tokens=int(blocks.numel()),
    )
    return EvalData(blocks=blocks, description=desc, batches=batches)
