"""Training a sentencepiece tokenizer on a text / JSONL corpus.

Choices and why:
  * pad/bos/eos/unk get the fixed ids 0/1/2/3 (`SPM_SPECIAL_IDS`), so eod (= `</s>`) is always 2
    and configs can rely on it.
  * byte_fallback=True: characters outside the learned vocab become <0xNN> byte pieces instead of
    <unk>, and normalization is "identity" with whitespace kept as is, so
    decode(encode(text)) == text for any UTF-8 text WITHOUT U+2581 (needed for lossless data and
    fair perplexities). U+2581 ("▁") is sentencepiece's own whitespace symbol: it is encoded as a
    space and decodes as " " (no sentencepiece option escapes it). Preprocessing counts and reports
    the documents that do not round-trip.
  * sentencepiece reads "sentences"; we feed it the lines of each document (it never sees the
    newline itself, which is encoded by byte fallback as the single piece <0x0A>).
  * sentencepiece silently skips a sentence longer than its max_sentence_length (bytes; its warning is
    hidden at our log level), so a document stored as one long line would never reach the
    vocabulary. A line over MAX_SENTENCE_BYTES is cut into chunks of at most that many bytes, each
    cut at the last space before the limit (pieces never span a space: sentencepiece splits at
    whitespace) or, in text without spaces, at a character boundary; the lines cut and the chunks
    made are counted (``stats``) and tools/train_tokenizer.py reports them.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterator, Optional, Sequence, Union

from megatron_outeff.errors import OutEffError

from .corpus import iter_documents
from .tokenizer import SPM_SPECIAL_IDS

MODEL_TYPES = ("bpe", "unigram")
MAX_SENTENCE_BYTES = 1 << 16  # sentencepiece's max_sentence_length (bytes): longer lines are cut, never skipped


def chunk_line(line: str, limit: int = MAX_SENTENCE_BYTES) -> list[str]:
    """``line`` cut into pieces of at most ``limit`` UTF-8 bytes whose concatenation is ``line``: each cut
    just before the last space within the limit (the space starts the next piece, as sentencepiece marks a
    word start), else at the last character boundary (text without spaces)."""
    if limit < 4:
        raise ValueError(f"limit {limit}: expected >= 4 bytes (one UTF-8 character)")
    data = line.encode("utf-8")
    if len(data) <= limit:
        return [line]
    chunks, start = [], 0
    while len(data) - start > limit:
        end = start + limit
        cut = data.rfind(b" ", start + 1, end + 1)
        if cut <= start:
            cut = end
            while data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back off to the character's start
                cut -= 1
        chunks.append(data[start:cut].decode("utf-8"))
        start = cut
    chunks.append(data[start:].decode("utf-8"))
    return chunks


def _sentences(inputs, json_key: str, txt_mode: str, counter: dict) -> Iterator[str]:
    for doc in iter_documents(inputs, json_key=json_key, txt_mode=txt_mode):
        counter["documents"] += 1
        for line in doc.splitlines():
            if line.strip():
                pieces = chunk_line(line)
                if len(pieces) > 1:
                    counter["long_lines"] += 1
                    counter["chunks"] += len(pieces)
                for piece in pieces:
                    if piece.strip():
                        counter["sentences"] += 1
                        yield piece


def train_sentencepiece(
    inputs: Union[str, Sequence[str]],
    model_prefix: str,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    json_key: str = "text",
    txt_mode: str = "file",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 2_000_000,
    num_threads: Optional[int] = None,
    seed_sentencepiece_size: int = 1_000_000,
    verbose: bool = False,
    overwrite: bool = False,
    stats: Optional[dict] = None,
) -> str:
    """Train a sentencepiece model on `inputs` (paths/globs of .txt or .jsonl files).

    Writes `model_prefix + ".model"` and `".vocab"` (via temporary names, renamed at the end) and
    returns the .model path. `input_sentence_size` caps the lines sentencepiece samples (it holds
    them in memory). Raises OutEffError for bad input, an empty corpus, an impossible vocab size or
    an existing output without `overwrite`. `stats` (a dict, optional) receives the counts:
    documents, sentences (what sentencepiece was given), long_lines (lines over MAX_SENTENCE_BYTES,
    cut) and chunks (the pieces they were cut into).
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise OutEffError(f"unknown model type {model_type!r} (choose from {', '.join(MODEL_TYPES)})")
    min_vocab = len(SPM_SPECIAL_IDS) + 256 + 1  # specials + 256 byte pieces + at least one piece
    if vocab_size < min_vocab:
        raise OutEffError(f"vocab size {vocab_size} too small: byte fallback needs >= {min_vocab}")
    existing = [p for p in (model_prefix + ".model", model_prefix + ".vocab") if os.path.exists(p)]
    if existing and not overwrite:
        raise OutEffError(f"output exists: {existing[0]} (pass --overwrite to replace it)")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))

    counter = {"documents": 0, "sentences": 0, "long_lines": 0, "chunks": 0}
    sentences = _sentences(inputs, json_key, txt_mode, counter)
    # Pull the first sentence here so input errors (and an empty corpus) surface as OutEffError
    # before sentencepiece starts, rather than as an exception from inside its C++ callback.
    first = next(sentences, None)
    if first is None:
        raise OutEffError(f"empty corpus: no non-blank text in {inputs}")

    def all_sentences():
        yield first
        yield from sentences

    created = not os.path.isdir(out_dir)  # made only now, after the inputs proved readable; removed on failure
    os.makedirs(out_dir, exist_ok=True)
    try:
        path = _train(
            spm,
            all_sentences(),
            model_prefix,
            out_dir,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads or min(os.cpu_count() or 1, 16),
            minloglevel=0 if verbose else 2,
        )
        if stats is not None:
            stats.update(counter)
        return path
    except BaseException:
        if created:
            try:
                os.rmdir(out_dir)
            except OSError:
                pass
        raise


# The trainer options every model of ours is trained with (the module doc's contract: specials, byte
# fallback, identity normalisation, whitespace kept).
_SPM_FIXED_OPTIONS = dict(
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    pad_id=SPM_SPECIAL_IDS["<pad>"],
    bos_id=SPM_SPECIAL_IDS["<s>"],
    eos_id=SPM_SPECIAL_IDS["</s>"],
    unk_id=SPM_SPECIAL_IDS["<unk>"],
    pad_piece="<pad>",
    bos_piece="<s>",
    eos_piece="</s>",
    unk_piece="<unk>",
    shuffle_input_sentence=True,
    max_sentence_length=MAX_SENTENCE_BYTES,
)


def _train(spm, all_sentences, model_prefix, out_dir, **options) -> str:
    """sentencepiece's trainer on ``all_sentences`` with ``_SPM_FIXED_OPTIONS`` and ``options`` (the caller's
    sizes, threads and log level), written to ``model_prefix``.model/.vocab through a temporary directory."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spm-train-") as tmp:
        tmp_prefix = os.path.join(tmp, "m")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=all_sentences, model_prefix=tmp_prefix, **_SPM_FIXED_OPTIONS, **options
            )
        except OutEffError:
            raise
        except RuntimeError as e:
            # e.g. "Vocabulary size is too high (8192). Please set it to a value <= 1234."
            msg = " ".join(str(e).split())
            raise OutEffError(f"sentencepiece training failed: {msg}") from None
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, model_prefix + ext)
    return model_prefix + ".model"
