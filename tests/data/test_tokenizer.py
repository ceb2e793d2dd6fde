"""Tokenizer adapters and sentencepiece training: lossless round trips, special ids, errors."""

import json
import os
import pickle

import pytest

from megatron_outeff.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from megatron_outeff.errors import OutEffError

ROUND_TRIP = [
    "Hello world.",
    " leading and trailing spaces  ",
    "multiple   spaces\tand\ttabs\n\nand blank lines\n",
    "windows\r\nline\rendings",
    "unicode: naïve façade Ωμέγα 日本語 🙂 e\u0301 x\u200by a\u00a0b",
    "never-seen chars: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃\u2028",
    "literal specials stay text: <pad> <s> <unk>",
    "",
    "   ",
    "\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_round_trip(spm_model, text):
    tok = load_tokenizer(spm_model)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    # encode never emits the special ids: eod enters the data only through preprocessing
    assert not {tok.pad, tok.bos, tok.eod} & set(ids)


def test_sentencepiece_special_ids(spm_model):
    tok = load_tokenizer(spm_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad, tok.bos, tok.eod, tok.unk) == (0, 1, 2, 3)
    assert tok.eos == tok.eod and tok.eod_token == "</s>"
    assert tok.vocab_size == 400
    assert tok.tokenize("abc") == tok.encode("abc") and tok.detokenize([5, 6]) == tok.decode([5, 6])
    uid = tok.unique_identifiers
    assert uid["eod"] == 2 and uid["vocab_size"] == 400 and len(uid["tokenizer_sha256"]) == 16
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("pickled ok") == tok.encode("pickled ok")


def test_unigram_option(data_dir, corpus):
    from megatron_outeff.data.tokenizer_training import train_sentencepiece

    path = train_sentencepiece(
        corpus["b"], str(data_dir / "tok" / "uni"), vocab_size=400, model_type="unigram", num_threads=1
    )
    tok = load_tokenizer(path)
    text = ROUND_TRIP[4]
    assert tok.decode(tok.encode(text)) == text and tok.eod == 2


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_hf_tokenizer_json_round_trip(hf_tokenizer_json, text):
    tok = load_tokenizer(hf_tokenizer_json)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_hf_special_tokens_and_eod_choice(hf_tokenizer_json, tmp_path):
    tok = load_tokenizer(hf_tokenizer_json)
    assert tok.eod_token == "</s>" and tok.eod == 2  # OPT convention when no <|endoftext|>
    assert (tok.bos, tok.pad, tok.unk) == (0, 1, 3)
    # a directory holding tokenizer.json loads too; the eod token is configurable
    import os

    tok2 = load_tokenizer(os.path.dirname(hf_tokenizer_json), eod_token="<s>")
    assert tok2.eod == 0
    with pytest.raises(OutEffError, match="eod token"):
        load_tokenizer(hf_tokenizer_json, eod_token="<|nope|>")

    # GPT-2 style vocab: <|endoftext|> is preferred, and a missing pad reads as AttributeError
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        ["some text here"] * 5,
        trainers.BpeTrainer(
            vocab_size=270,
            special_tokens=["<|endoftext|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    t.save(str(tmp_path / "gpt2.json"))
    g = load_tokenizer(tmp_path / "gpt2.json")
    assert g.eod_token == "<|endoftext|>" and g.eod == 0
    assert getattr(g, "pad", None) is None


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.model", None, "tokenizer not found"),
        ("vocab.txt", b"x", "unknown tokenizer file type"),
        ("bad.model", b"not a model", "cannot load sentencepiece"),
        ("bad.json", b"{}", "cannot load Hugging Face"),
    ],
)
def test_load_tokenizer_errors(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(OutEffError, match=message):
        load_tokenizer(tmp_path / name)
    for e in (OutEffError("x"),):
        assert "\n" not in str(e)


def test_train_tokenizer_errors(tmp_path):
    from megatron_outeff.data.tokenizer_training import train_sentencepiece

    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(OutEffError, match="empty corpus"):
        train_sentencepiece(str(tmp_path / "empty.txt"), str(tmp_path / "m"), vocab_size=300)
    (tmp_path / "small.txt").write_text("tiny corpus " * 10)
    with pytest.raises(OutEffError, match="sentencepiece training failed"):
        train_sentencepiece(str(tmp_path / "small.txt"), str(tmp_path / "m"), vocab_size=5000, num_threads=1)
    with pytest.raises(OutEffError, match="too small"):
        train_sentencepiece(str(tmp_path / "small.txt"), str(tmp_path / "m"), vocab_size=100)
    with pytest.raises(OutEffError, match="not found"):
        train_sentencepiece(str(tmp_path / "nope.txt"), str(tmp_path / "m"))
    assert not list(tmp_path.glob("m.*"))


def test_sentencepiece_round_trip_exception_is_exactly_u2581(spm_model):
    """The narrowed promise: text holding U+2581 (sentencepiece's whitespace symbol) decodes it as a
    space; the same text without it round-trips."""
    tok = load_tokenizer(spm_model)
    assert tok.decode(tok.encode("a\u2581b")) == "a b"
    assert tok.decode(tok.encode("a b")) == "a b"


def test_long_lines_reach_the_vocabulary(tmp_path):
    """A document stored as one line longer than sentencepiece's max_sentence_length (which sentencepiece
    skips silently) is cut at spaces and trained on: its only word becomes one piece, and the cut is
    counted."""
    import sentencepiece as spm

    from megatron_outeff.data.tokenizer_training import MAX_SENTENCE_BYTES, chunk_line, train_sentencepiece

    filler = [f"the {w} of and to in a is" for w in ("cat", "dog", "sun", "sea")] * 50
    long_doc = " ".join(["quokkaberry"] * (MAX_SENTENCE_BYTES // 12 + 200))  # ~67 KB, one line
    assert len(long_doc.encode()) > MAX_SENTENCE_BYTES
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in [*filler, long_doc]) + "\n")
    stats = {}
    model = train_sentencepiece(str(corpus), str(tmp_path / "m"), vocab_size=300, num_threads=1, stats=stats)
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.encode("quokkaberry", out_type=str) == ["\u2581quokkaberry"]
    assert stats["long_lines"] == 1 and stats["chunks"] == 2 and stats["documents"] == len(filler) + 1

    # the cut: pieces of at most the limit, at a space, concatenating to the line; no space -> a character boundary
    pieces = chunk_line(long_doc)
    assert "".join(pieces) == long_doc and all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces)
    assert pieces[1].startswith(" quokkaberry")
    cjk = "日本語" * 30000
    pieces = chunk_line(cjk)
    assert "".join(pieces) == cjk and all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces) and len(pieces) == 5


def test_vocab_refusal_has_one_owner(spm_model, hf_tokenizer_json, tmp_path):
    """check_vocab_fits is training's refusal (data.tokenizer of a model with a smaller vocabulary) and the
    exports' (tests/tools/test_bad_inputs.py *_larger_than_vocab); tokenizer_id_count counts largest id + 1."""
    from megatron_outeff.data.tokenizer import check_vocab_fits, tokenizer_id_count
    from megatron_outeff.training.config import load_config
    from megatron_outeff.training.data import indexed_samplers

    assert tokenizer_id_count(spm_model) == 400 == load_tokenizer(spm_model).vocab_size
    assert tokenizer_id_count(hf_tokenizer_json) == load_tokenizer(hf_tokenizer_json).vocab_size
    data = json.loads(open(hf_tokenizer_json).read())
    data["model"]["vocab"]["late"] = 999  # a hole in the id range
    (tmp_path / "holes.json").write_text(json.dumps(data))
    assert tokenizer_id_count(tmp_path / "holes.json") == 1000  # the id, not the count of entries
    check_vocab_fits(400, 400, "t")
    with pytest.raises(
        OutEffError, match=r"^t has 401 tokens but the model's vocabulary is 400 \(every token id must be < 400\)$"
    ):
        check_vocab_fits(401, 400, "t")
    demo = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "configs",
        "train",
        "demo-tiny.yaml",
    )
    cfg = load_config(
        demo, ["data.source=indexed", f"data.tokenizer={spm_model}", f"data.train_paths=[{tmp_path / 'none'}]"]
    )
    with pytest.raises(OutEffError, match=r"data.tokenizer has 400 tokens but the model's vocabulary is 256 \(every"):
        indexed_samplers(cfg, vocab_size=256)
