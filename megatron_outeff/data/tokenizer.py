"""Tokenizer adapters that megatron-core's GPTDataset accepts, over two backends.

megatron-core 0.16.1 types `GPTDatasetConfig.tokenizer` as `megatron.core.tokenizers.
MegatronTokenizerBase`, but only duck-types it: GPTDataset reads `.eod`, `.vocab_size`, the
optional `.pad` / `.eos` (pad-collision check in MegatronDataset), and `.unique_identifiers`, which
is json-dumped into the hash that names the cached sample indices. We do NOT subclass the ABC here
because importing anything under `megatron.core` costs ~5 s per process (its package __init__
pulls in the whole model stack), which every tokenizer CLI and preprocessing worker would pay;
`megatron_outeff.data.datasets` registers these classes as virtual subclasses of
MegatronTokenizerBase instead, so `isinstance` checks there still hold. (The other base,
`megatron.core.datasets.megatron_tokenizer.MegatronLegacyTokenizer`, is deprecated in 0.16.1 and
logs a warning on every construction.)

Backends:
  * sentencepiece `.model` (what tools/train_tokenizer.py writes): eod is the model's `</s>`.
  * Hugging Face `tokenizer.json` via the `tokenizers` library (GPT-2/OPT-style byte-level BPE):
    eod is configurable; default `<|endoftext|>` if the vocab has it (GPT-2), else `</s>` (OPT).

Encoding never adds special tokens (no BOS, no OPT-style leading `</s>`): documents get exactly
one eod appended by the preprocessing step, which is the only place special ids enter the data.

Saving a sentencepiece model as a Hugging Face-loadable tokenizer (for the HF export of a
trained model): `megatron_outeff.data.hf_tokenizer.save_hf_tokenizer`, which rebuilds it with the
`tokenizers` library (exact encode/decode, pad/bos/eos/unk = 0/1/2/3, no automatic BOS/EOS).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Iterable, List, Optional

from megatron_outeff.errors import OutEffError

# Fixed ids train_sentencepiece reserves, so the eod id of our own tokenizers is always 2.
SPM_SPECIAL_IDS = OrderedDict([("<pad>", 0), ("<s>", 1), ("</s>", 2), ("<unk>", 3)])


def _file_digest(path: str) -> str:
    # Content hash rather than path in unique_identifiers: the GPTDataset index cache stays valid
    # when a tokenizer file is moved, and is invalidated when it is retrained in place.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class Tokenizer:
    """Common surface of both backends (what GPTDataset and our pipeline call).

    Attributes/properties: `eod`, `vocab_size`, `vocab`, `inv_vocab`, `unique_identifiers`,
    `pad` / `bos` / `eos` / `unk` (raise AttributeError when the vocab lacks the token, so
    `getattr(tok, "pad", None)` works and megatron falls back to its own pad id).
    Methods: `tokenize(text) -> list[int]` (= `encode`), `detokenize(ids) -> str` (= `decode`).
    """

    backend: str = "?"

    def __init__(self, path: str, eod_token: Optional[str]):
        self.path = os.path.abspath(path)
        self._eod_token_arg = eod_token
        self.library = self.backend  # mirrors megatron's MegatronTokenizerBase config attribute

    # --- encoding -------------------------------------------------------------------------
    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def detokenize(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        return self.tokenize(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.detokenize(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pretraining tokenizers here have no chat template")

    # --- vocabulary -------------------------------------------------------------------------
    @property
    def vocab(self) -> dict:
        raise NotImplementedError

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def _special(self, token: str, name: str) -> int:
        i = self.token_to_id(token)
        if i is None:
            raise AttributeError(f"{type(self).__name__} has no {name} token ({token!r} not in vocab)")
        return i

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eod_token(self) -> str:
        return self._eod_token

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        # Hashed by megatron into the names of cached document/sample/shuffle indices.
        return OrderedDict(
            [
                ("class", type(self).__name__),
                ("tokenizer_sha256", self._digest),
                ("eod", self.eod),
                ("vocab_size", self.vocab_size),
            ]
        )

    def __reduce__(self):
        # Reload from the file on unpickle (DataLoader workers under spawn, multiprocessing):
        # the backend objects are not reliably picklable and the files are small.
        return (load_tokenizer, (self.path, self._eod_token_arg))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod} {self._eod_token!r})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`; eod defaults to the model's eos piece (`</s>`, id 2 for ours)."""

    backend = "sentencepiece"

    def __init__(self, path: str, eod_token: Optional[str] = None):
        super().__init__(path, eod_token)
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with long text
            raise OutEffError(f"cannot load sentencepiece model {path!r}: {str(e).splitlines()[0]}") from None
        self._digest = _file_digest(self.path)
        if eod_token is None:
            eos = self._sp.eos_id()
            if eos < 0:
                raise OutEffError(f"sentencepiece model {path!r} has no eos piece; pass eod_token")
            self._eod, self._eod_token = eos, self._sp.id_to_piece(eos)
        else:
            i = self.token_to_id(eod_token)
            if i is None:
                raise OutEffError(f"eod token {eod_token!r} is not in sentencepiece model {path!r}")
            self._eod, self._eod_token = i, eod_token

    def tokenize(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    def token_to_id(self, token: str) -> Optional[int]:
        i = self._sp.piece_to_id(token)
        # piece_to_id maps unknown pieces to unk; only the unk piece itself may return unk's id.
        if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
            return None
        return i

    @property
    def pad(self) -> int:
        i = self._sp.pad_id()
        if i < 0:
            raise AttributeError("sentencepiece model has no pad piece")
        return i

    @property
    def bos(self) -> int:
        i = self._sp.bos_id()
        if i < 0:
            raise AttributeError("sentencepiece model has no bos piece")
        return i

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unk(self) -> int:
        return self._sp.unk_id()


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (loaded with the `tokenizers` library, not transformers).

    Special-token names follow GPT-2/OPT conventions: eod `<|endoftext|>` if present else `</s>`;
    pad `<pad>`, bos `<s>`, unk `<unk>` when the vocab has them (GPT-2 has none of those).
    Note: the backend splits added special tokens out of raw text, so a document that literally
    contains e.g. "</s>" encodes it as the special id (same as Megatron-LM's GPT-2 path).
    """

    backend = "huggingface"

    def __init__(self, path: str, eod_token: Optional[str] = None):
        super().__init__(path, eod_token)
        from tokenizers import Tokenizer as _HFTok

        try:
            self._tok = _HFTok.from_file(self.path)
        except Exception as e:
            raise OutEffError(f"cannot load Hugging Face tokenizer {path!r}: {str(e).splitlines()[0]}") from None
        self._digest = _file_digest(self.path)
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        candidates = [eod_token] if eod_token is not None else ["<|endoftext|>", "</s>"]
        for tok in candidates:
            if tok in self._vocab:
                self._eod, self._eod_token = self._vocab[tok], tok
                break
        else:
            raise OutEffError(
                f"Hugging Face tokenizer {path!r} has none of the eod tokens {candidates}; pass eod_token"
            )

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        # max id + 1 rather than len(vocab): added tokens may leave holes in the id range, and
        # the embedding must cover the largest id.
        return max(self._vocab.values()) + 1

    @property
    def vocab(self) -> dict:
        return dict(self._vocab)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._vocab.get(token)

    @property
    def pad(self) -> int:
        return self._special("<pad>", "pad")

    @property
    def bos(self) -> int:
        return self._special("<s>", "bos")

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unk(self) -> int:
        return self._special("<unk>", "unk")


def _resolve(path: str) -> str:
    """A directory stands for the tokenizer file inside it (HF-style save dirs, our run dirs)."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        models = sorted(n for n in os.listdir(path) if n.endswith(".model"))
        if len(models) == 1:
            return os.path.join(path, models[0])
        raise OutEffError(f"no tokenizer.json or single *.model file in directory {path!r}")
    return path


def tokenizer_file(path: "str | os.PathLike") -> str:
    """The tokenizer file ``path`` stands for: itself, or for a directory the tokenizer file inside it
    (as ``load_tokenizer`` picks it). OutEffError for a directory without one."""
    return _resolve(os.fspath(path))


def load_tokenizer(path: "str | os.PathLike", eod_token: Optional[str] = None) -> Tokenizer:
    """Load a tokenizer, choosing the backend by file type.

    `path`: a sentencepiece `*.model`, a Hugging Face `*.json` (tokenizer.json), or a directory
    holding `tokenizer.json` / `tokenizer.model` / exactly one `*.model`.
    `eod_token`: the end-of-document token; default: the sentencepiece eos piece, or for
    tokenizer.json `<|endoftext|>` if present else `</s>`.
    Raises OutEffError (one line) for a missing file or unknown type.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise OutEffError(f"tokenizer not found: {path}")
    path = _resolve(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, eod_token)
    if path.endswith(".json"):
        return HFTokenizer(path, eod_token)
    raise OutEffError(
        f"unknown tokenizer file type: {path} (expected a sentencepiece .model or a Hugging Face tokenizer.json)"
    )


def check_vocab_fits(num_ids: int, vocab_size: int, what: str) -> None:
    """The one refusal of a tokenizer whose ids do not fit a model's embedding (training's data.tokenizer,
    every export and conversion that takes a tokenizer): OutEffError ``<what> has N tokens but the
    model's vocabulary is V``. ``num_ids``: the tokenizer's largest id + 1 (``Tokenizer.vocab_size``,
    ``tokenizer_id_count``); ``vocab_size``: the model's (unpadded) vocabulary."""
    if int(num_ids) > int(vocab_size):
        raise OutEffError(
            f"{what} has {int(num_ids)} tokens but the model's vocabulary is {int(vocab_size)} "
            f"(every token id must be < {int(vocab_size)})"
        )


def tokenizer_id_count(path: "str | os.PathLike") -> int:
    """Largest token id + 1 of a sentencepiece ``.model``, a ``tokenizer.json`` or a directory holding one
    (as ``load_tokenizer`` resolves it), added tokens included; no eod token needed. OutEffError when
    ``path`` holds neither."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise OutEffError(f"tokenizer not found: {path}")
    path = _resolve(path)
    if path.endswith(".model"):
        return _spm_piece_count(path)
    if path.endswith(".json"):
        from tokenizers import Tokenizer as _HFTok

        try:
            vocab = _HFTok.from_file(path).get_vocab(with_added_tokens=True)
        except Exception as e:
            raise OutEffError(f"cannot load Hugging Face tokenizer {path!r}: {str(e).splitlines()[0]}") from None
        return max(vocab.values()) + 1 if vocab else 0
    raise OutEffError(
        f"unknown tokenizer file type: {path} (expected a sentencepiece .model or a Hugging Face tokenizer.json)"
    )


def _spm_piece_count(path: str) -> int:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=path).get_piece_size()
    except Exception as e:
        raise OutEffError(f"cannot load sentencepiece model {path!r}: {str(e).splitlines()[0]}") from None


def token_dtype_for_vocab(vocab_size: int):
    """numpy dtype for token ids of a vocab: megatron's own rule (DType.optimal_dtype: uint16
    below 65500, else int32), restated here so the CLIs need not import megatron.core."""
    import numpy

    return numpy.uint16 if vocab_size < 65500 else numpy.int32


__all__ = [
    "Tokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "tokenizer_file",
    "check_vocab_fits",
    "tokenizer_id_count",
    "token_dtype_for_vocab",
    "SPM_SPECIAL_IDS",
]
