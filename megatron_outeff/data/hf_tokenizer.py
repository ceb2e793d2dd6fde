"""Save one of our tokenizers as a Hugging Face tokenizer directory.

    save_hf_tokenizer(tokenizer_path, out_dir) -> list[Path]

`tokenizer_path`: a sentencepiece `.model` (BPE or unigram, as `train_sentencepiece` writes) or a
Hugging Face `tokenizer.json`. Writes `tokenizer.json` and `tokenizer_config.json` into the
existing directory `out_dir`, so that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads a
`PreTrainedTokenizerFast` that encodes and decodes exactly like `load_tokenizer(tokenizer_path)`:
no BOS/EOS added on encode, special pieces in raw text are NOT matched as special tokens
(`split_special_tokens`), same as sentencepiece.

The sentencepiece model is rebuilt with the `tokenizers` library from the model proto (no
transformers converter: they assume Llama-style settings and drop details we need):
  * normalizer: the model's precompiled charsmap if any (empty for our "identity" rule), then the
    dummy prefix "▁" if `add_dummy_prefix` is on (it is: train_sentencepiece keeps the default),
    then " " -> "▁". No pre-tokenizer: sentencepiece encodes the whole normalized text at once
    (pieces never cross whitespace only because the vocab has none that do).
  * BPE: sentencepiece merges the adjacent pair whose concatenation is the highest-scoring normal
    piece (leftmost on ties). The equivalent `tokenizers` BPE has, for every normal piece, one merge
    per split into two normal pieces, ranked by the piece's score. Byte fallback on.
  * unigram: the same Viterbi model (scores, unk penalty, byte fallback). Control, unknown and byte
    pieces get a very low score, as sentencepiece never matches them in text, and characters
    outside the vocab are cut out as their own pre-tokens (see `_unknown_char_split`).
  * decoder: "▁" -> " ", byte pieces -> UTF-8, fuse, strip the one leading space of the dummy prefix.
Settings we do not reproduce (user-defined pieces, remove_extra_whitespaces,
treat_whitespace_as_suffix) are refused with a ValueError instead of exported inexactly.

Known difference: decoding ids that contain special tokens (<s>, </s>, <pad>) — sentencepiece
renders them as "", transformers as their text unless `skip_special_tokens=True`.

Megatron-free on purpose (used by the HF export path).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import List, Union

from megatron_outeff.errors import OutEffError

SPACE = "\u2581"  # sentencepiece's whitespace symbol "▁"

# sentencepiece ModelProto.SentencePiece.Type / TrainerSpec.ModelType values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_UNREACHABLE_SCORE = -1e9  # unigram score of pieces sentencepiece never matches in text


def _fail(msg: str):
    raise OutEffError(msg)  # the message names the file; callers add the flag (convert_checkpoint: --tokenizer)


def _load_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf DecodeError etc.
        _fail(f"{path} is not a sentencepiece model ({type(e).__name__})")
    if not proto.pieces:
        _fail(f"{path} is not a sentencepiece model (no pieces)")
    return proto


def _spm_backend(proto):
    """A `tokenizers.Tokenizer` reproducing the sentencepiece model `proto`."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    types = {t for _, _, t in pieces}
    if _USER_DEFINED in types or _UNUSED in types:
        _fail("sentencepiece models with user-defined or unused pieces are not supported")
    if ns.remove_extra_whitespaces:
        _fail("sentencepiece models with remove_extra_whitespaces=True are not supported")
    if ts.treat_whitespace_as_suffix:
        _fail("sentencepiece models with treat_whitespace_as_suffix=True are not supported")
    if not ts.byte_fallback:
        _fail("sentencepiece models without byte_fallback are not supported")
    unk_id = next((i for i, (_, _, t) in enumerate(pieces) if t == _UNKNOWN), None)
    if unk_id is None:
        _fail("sentencepiece model has no unknown piece")

    if ts.model_type == _BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        normal = {piece: i for i, (piece, _, t) in enumerate(pieces) if t == _NORMAL}
        merges = []  # (score, id of merged piece, split position, left, right)
        for piece, i in normal.items():
            score = pieces[i][1]
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in normal and right in normal:
                    merges.append((-score, i, k, left, right))
        merges.sort()
        model = BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in merges],
            unk_token=pieces[unk_id][0],
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    elif ts.model_type == _UNIGRAM:
        vocab = [(piece, float(score) if t == _NORMAL else _UNREACHABLE_SCORE) for piece, score, t in pieces]
        model = Unigram(vocab, unk_id=unk_id, byte_fallback=True)
        unknown_char_split = _unknown_char_split(pieces)
    else:
        _fail(f"unsupported sentencepiece model type {ts.model_type} (only BPE and unigram)")

    tok = Tokenizer(model)
    if ts.model_type == _UNIGRAM and unknown_char_split is not None:
        tok.pre_tokenizer = unknown_char_split
    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend(SPACE))
    if ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", SPACE))
    if norm:
        tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    specials = [AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens(specials)
    return tok


def _unknown_char_split(pieces):
    """Unigram only: a pre-tokenizer isolating every character that is not a single-character
    normal piece, or None where that would not be exact.

    The `tokenizers` Unigram lattice matches every vocab string, "<s>" and "<0x41>" included, and
    scores unknown characters relative to the lowest score in the vocab, so no score keeps a
    literal "<s>" in text from winning over unknown "<" / ">". Sentencepiece covers an unknown
    character with a node of its own, so cutting the text around such characters changes nothing
    there and breaks the special strings apart. (Literal special strings made only of known
    characters already lose: their score is far below any path of normal pieces.) Only exact when
    no normal piece contains an unknown character; otherwise None (literal special strings in
    raw text may then encode differently).
    """
    from tokenizers import Regex, pre_tokenizers

    normal = [p for p, _, t in pieces if t == _NORMAL]
    known = {p for p in normal if len(p) == 1}
    if any(ch not in known for p in normal for ch in p):
        return None
    cls = "".join(f"\\x{{{ord(ch):X}}}" for ch in sorted(known))
    return pre_tokenizers.Split(Regex(f"[^{cls}]"), behavior="isolated")


def _special_names(proto) -> dict:
    ts = proto.trainer_spec
    names = {}
    for key, i in (
        ("bos_token", ts.bos_id),
        ("eos_token", ts.eos_id),
        ("unk_token", ts.unk_id),
        ("pad_token", ts.pad_id),
    ):
        if 0 <= i < len(proto.pieces):
            names[key] = proto.pieces[i].piece
    return names


def _json_special_names(path: Path) -> dict:
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:
        _fail(f"cannot load Hugging Face tokenizer {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    names = {}
    eos = "<|endoftext|>" if "<|endoftext|>" in vocab else "</s>"  # load_tokenizer's eod rule
    for key, token in (("bos_token", "<s>"), ("eos_token", eos), ("unk_token", "<unk>"), ("pad_token", "<pad>")):
        if token in vocab:
            names[key] = token
    return names


def _config(specials: dict, **extra) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        **extra,
    }


def save_hf_tokenizer(tokenizer_path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike]) -> List[Path]:
    """Write tokenizer.json + tokenizer_config.json for `tokenizer_path` into the existing directory
    `out_dir`; returns the written paths. Raises a one-line ValueError for a missing file, an
    unknown file type or an unsupported sentencepiece model."""
    src, out = Path(tokenizer_path), Path(out_dir)
    if not src.is_file():
        _fail(f"tokenizer file not found: {src}")
    if not out.is_dir():
        _fail(f"output directory does not exist: {out}")
    tok_json, cfg_json = out / "tokenizer.json", out / "tokenizer_config.json"
    if src.suffix == ".model":
        proto = _load_proto(src)
        _spm_backend(proto).save(str(tok_json))
        # split_special_tokens: sentencepiece never reads "</s>" etc. in raw text as special ids.
        cfg = _config(_special_names(proto), split_special_tokens=True)
    elif src.suffix == ".json":
        specials = _json_special_names(src)
        if src.resolve() != tok_json.resolve():
            shutil.copyfile(src, tok_json)
        cfg = _config(specials)
    else:
        _fail(f"unknown tokenizer file type: {src} (expected a sentencepiece .model or a tokenizer.json)")
    cfg_json.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [tok_json, cfg_json]


__all__ = ["save_hf_tokenizer"]
