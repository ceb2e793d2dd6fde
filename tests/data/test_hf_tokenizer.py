"""save_hf_tokenizer: a sentencepiece model (BPE and unigram) exported as a Hugging Face tokenizer
directory loads offline with AutoTokenizer and encodes/decodes exactly like our tokenizer."""

import json
import os
import random

import pytest

from megatron_outeff.data.hf_tokenizer import save_hf_tokenizer
from megatron_outeff.data.tokenizer import load_tokenizer
from megatron_outeff.data.tokenizer_training import train_sentencepiece

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Hand-written cases: whitespace runs, tabs, newlines, CRLF, digits, accents (composed and
# combining), emoji, and characters never seen in training (byte fallback), control chars.
EDGE = [
    "",
    " ",
    "  ",
    "   x",
    "a",
    " a",
    "a ",
    "a  b   c",
    "\n",
    "\n\n",
    "\r\n",
    "line1\r\nline2\n",
    "\t",
    "\t\tindented\ttabs",
    " \t \n ",
    "12345 6.78 -9e10 0x1F",
    "naïve façade café",
    "e\u0301 vs \u00e9",
    "Ωμέγα 日本語 🙂🙂👍🏽",
    "中文没有见过 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ẞ Ж ש ع",
    "\u0000\u007f\u00a0\u200b\u2028",
    "▁ literal sentencepiece space ▁▁",
    "mixed 🙂tab\there  end  ",
]
LITERAL_SPECIALS = ["</s>", "<s>", "<unk>", "<pad>", "<0x41>", "x</s>y <s> z"]


def _texts(docs, seed=0, n=150):
    rng = random.Random(seed)
    out = list(docs[:60]) + EDGE
    for _ in range(n):  # random substrings: start mid-word, mid-whitespace, end anywhere
        d = rng.choice(docs)
        s = rng.randrange(len(d))
        out.append(d[s : s + rng.randint(0, 120)])
    for _ in range(30):  # random joins with unusual separators
        out.append(rng.choice(["\r\n", "  ", "\t", "\n\n", " 🙂 ", "ß"]).join(rng.sample(EDGE + docs[:5], 3)))
    return out


@pytest.fixture(scope="module")
def docs(corpus):
    return corpus["docs_a"]  # conftest: random words with unicode, tabs, newlines, odd spaces


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def exported(request, tmp_path_factory, corpus):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(f"hftok_{request.param}")
    model = train_sentencepiece(corpus["a"], str(root / "spm"), vocab_size=400, model_type=request.param, num_threads=1)
    out = root / "hf"
    out.mkdir()
    written = save_hf_tokenizer(model, out)
    return dict(
        kind=request.param,
        model=model,
        out=out,
        written=written,
        ours=load_tokenizer(model),
        hf=AutoTokenizer.from_pretrained(out),
    )


def test_files_and_config(exported):
    assert sorted(p.name for p in exported["written"]) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((exported["out"] / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["pad_token"]) == ("<s>", "</s>", "<unk>", "<pad>")
    hf, ours = exported["hf"], exported["ours"]
    assert hf.eos_token_id == ours.eod == ours.eos == 2
    assert (hf.pad_token_id, hf.bos_token_id, hf.unk_token_id) == (ours.pad, ours.bos, ours.unk) == (0, 1, 3)
    assert len(hf) == ours.vocab_size
    assert hf.get_vocab() == ours.vocab
    backend = json.loads((exported["out"] / "tokenizer.json").read_text())
    assert backend["model"]["type"] == {"bpe": "BPE", "unigram": "Unigram"}[exported["kind"]]
    assert backend["model"]["byte_fallback"] is True
    if exported["kind"] == "unigram":  # unknown characters cut out (literal "<s>" fix) is active
        assert backend["pre_tokenizer"]["type"] == "Split"


def test_encode_decode_identical(exported, docs):
    hf, ours = exported["hf"], exported["ours"]
    texts = _texts(docs)
    assert len(texts) > 250
    byte_pieces = 0
    for t in texts:
        ids = ours.encode(t)
        assert hf(t, add_special_tokens=False).input_ids == ids, repr(t)
        assert hf.encode(t, add_special_tokens=False) == ids, repr(t)
        assert hf(t).input_ids == ids, repr(t)  # no automatic BOS/EOS either
        assert hf.decode(ids) == ours.decode(ids), repr(t)
        if "\u2581" not in t:  # sentencepiece itself decodes a literal "▁" as " "
            assert ours.decode(ids) == t, repr(t)
        byte_pieces += sum(1 for p in hf.convert_ids_to_tokens(ids) if p.startswith("<0x"))
    assert byte_pieces > 20  # byte fallback really exercised
    # documents as the data pipeline stores them (eod appended): special tokens skipped on decode
    for t in texts[:20]:
        ids = ours.encode(t) + [ours.eod]
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids) == t


def test_batch_encode_matches(exported, docs):
    hf, ours = exported["hf"], exported["ours"]
    texts = _texts(docs, seed=1, n=40)
    assert hf(texts, add_special_tokens=False).input_ids == [ours.encode(t) for t in texts]


def test_literal_special_strings_are_text(exported):
    # sentencepiece never reads "</s>" etc. in raw text as special ids; neither may the export.
    hf, ours = exported["hf"], exported["ours"]
    for t in LITERAL_SPECIALS:
        ids = ours.encode(t)
        assert not {0, 1, 2, 3} & set(ids)
        assert hf(t, add_special_tokens=False).input_ids == ids, repr(t)
        assert hf.decode(ids) == ours.decode(ids) == t


def test_tokenizer_json_is_copied(tmp_path, hf_tokenizer_json):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    out.mkdir()
    save_hf_tokenizer(hf_tokenizer_json, out)
    assert (out / "tokenizer.json").read_bytes() == open(hf_tokenizer_json, "rb").read()
    ours, hf = load_tokenizer(hf_tokenizer_json), AutoTokenizer.from_pretrained(out)
    assert hf.eos_token_id == ours.eod
    for t in EDGE:
        assert hf(t, add_special_tokens=False).input_ids == ours.encode(t)
        assert hf.decode(ours.encode(t)) == ours.decode(ours.encode(t))


def test_bad_inputs(tmp_path, exported):
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(ValueError, match="not found"):
        save_hf_tokenizer(tmp_path / "missing.model", out)
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="unknown tokenizer file type"):
        save_hf_tokenizer(bad, out)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff\x00not a proto")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        save_hf_tokenizer(junk, out)
    with pytest.raises(ValueError, match="output directory does not exist"):
        save_hf_tokenizer(exported["model"], tmp_path / "nope")
    assert list(out.iterdir()) == []
