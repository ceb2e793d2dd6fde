"""Raw corpus -> megatron indexed dataset (PREFIX.bin + PREFIX.idx).

Each document becomes one sequence (one "document" in the .idx, as megatron's GPT pipeline
expects) holding tokenizer.encode(doc) + [eod]. Documents whose text does not come back from
decode(encode(text)) (with our sentencepiece models: text holding U+2581, sentencepiece's own
whitespace symbol, which decodes as a space) are still written; they are counted and the first
one named in the stats (``lossy_documents``, ``first_lossy``), which the tool prints. The token dtype is megatron's rule for the vocab
(uint16 below 65500 ids, else int32).

Workers: documents are read and JSON-parsed in the main process (so input errors carry the file
and line) and tokenized by a multiprocessing Pool whose initializer loads the tokenizer once per
worker; `imap` keeps input order, so the output is identical for any worker count.

Atomicity: data is written to `PREFIX.bin.tmp-<pid>` / `PREFIX.idx.tmp-<pid>`; only after the
index is complete are they renamed, .bin first, then .idx (IndexedDataset.exists() needs both,
so there is no moment when a valid-looking but mismatched pair exists). On any failure the
temporaries are deleted. With overwrite, an old .idx is removed before the old .bin is replaced.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import numpy

from megatron_outeff.errors import OutEffError

from .corpus import expand_inputs, iter_documents
from .tokenizer import Tokenizer, load_tokenizer, token_dtype_for_vocab

# Per-process tokenizer of the pool workers (set by the Pool initializer).
_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(tokenizer_path: str, eod_token: Optional[str]) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path, eod_token)


def _encode_checked(tok: Tokenizer, text: str) -> tuple[List[int], bool]:
    """(encode(text) + [eod], whether decode gives the text back)."""
    ids = tok.encode(text)
    return ids + [tok.eod], tok.decode(ids) == text


def _encode_doc(text: str) -> tuple[List[int], bool]:
    return _encode_checked(_WORKER_TOKENIZER, text)


@dataclass
class PreprocessStats:
    prefix: str
    documents: int
    tokens: int  # including one eod per document
    dtype: str
    seconds: float
    lossy_documents: int = 0  # documents with decode(encode(text)) != text
    first_lossy: Optional[int] = None  # 0-based index of the first of them


def _bin_idx(prefix: str):
    return prefix + ".bin", prefix + ".idx"


def preprocess_corpus(
    inputs: Union[str, Sequence[str]],
    output_prefix: str,
    tokenizer: Union[str, Tokenizer],
    json_key: str = "text",
    txt_mode: str = "file",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    chunksize: int = 16,
    eod_token: Optional[str] = None,
) -> PreprocessStats:
    """Tokenize `inputs` (paths/globs of .txt/.jsonl) into `output_prefix`.bin/.idx.

    `tokenizer`: a path (loaded with `load_tokenizer(path, eod_token)`) or a loaded Tokenizer
    (workers reload it from its file). Raises OutEffError (one line) for a missing input, an
    unknown JSON key or invalid JSON line, an empty corpus, or an existing output without
    `overwrite`; in every failure case no .bin/.idx is left behind.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer, eod_token)
    tok_path, tok_eod = tok.path, tok._eod_token_arg
    files = expand_inputs(inputs)  # fail on missing inputs before touching the output
    if workers < 1:
        raise OutEffError(f"workers must be >= 1, got {workers}")

    bin_path, idx_path = _bin_idx(output_prefix)
    existing = [p for p in (bin_path, idx_path) if os.path.exists(p)]
    if existing and not overwrite:
        raise OutEffError(f"output exists: {existing[0]} (pass --overwrite to replace it)")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    created_dir = not os.path.isdir(out_dir)  # removed again if the run fails
    os.makedirs(out_dir, exist_ok=True)

    dtype = token_dtype_for_vocab(tok.vocab_size)
    suffix = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = bin_path + suffix, idx_path + suffix
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    pool = None
    n_docs = n_tokens = lossy = 0
    first_lossy = None
    t0 = time.time()
    bar = None
    try:
        docs = iter_documents(files, json_key=json_key, txt_mode=txt_mode)
        if workers == 1:

            def encoded():  # in-process: no pool start-up cost
                for d in docs:
                    yield _encode_checked(tok, d)

            stream: Iterable[tuple[List[int], bool]] = encoded()
        else:
            # fork: workers inherit the imported modules (megatron.core is ~5 s to import).
            ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok_path, tok_eod))
            stream = pool.imap(_encode_doc, docs, chunksize=chunksize)
        if progress:
            from tqdm import tqdm

            # stdout: stderr carries only the error line if the input turns out bad
            bar = tqdm(
                desc=f"tokenizing -> {os.path.basename(output_prefix)}",
                unit="doc",
                file=sys.stdout,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        for ids, lossless in stream:
            if not lossless:
                lossy += 1
                first_lossy = n_docs if first_lossy is None else first_lossy
            arr = numpy.asarray(ids, dtype=numpy.int64)
            builder.add_document(arr, [arr.size])
            n_docs += 1
            n_tokens += arr.size
            if bar is not None:
                bar.update(1)
                if n_docs % 64 == 0:
                    bar.set_postfix(tokens=n_tokens, tok_per_s=f"{n_tokens / max(time.time() - t0, 1e-9):.3g}")
        if n_docs == 0:
            raise OutEffError(f"empty corpus: no non-blank documents in {', '.join(files)}")
        if bar is not None:
            bar.set_postfix(tokens=n_tokens, tok_per_s=f"{n_tokens / max(time.time() - t0, 1e-9):.3g}")
        builder.finalize(tmp_idx)
        # Publish: remove a stale .idx first so an old index never pairs with the new .bin.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException:
        if not builder.data_file.closed:
            builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        if created_dir:
            try:
                os.rmdir(out_dir)
            except OSError:
                pass
        raise
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return PreprocessStats(
        output_prefix, n_docs, n_tokens, numpy.dtype(dtype).name, time.time() - t0, lossy, first_lossy
    )
