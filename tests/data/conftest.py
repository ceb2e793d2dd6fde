"""Shared fixtures of the data-pipeline tests: tiny generated corpora and tokenizers trained on
them in-test (no network, no files outside tmp), built once per session to keep the suite fast."""

import json
import os
import random

import pytest

WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at "
    "which but have an they you were her she there been one all we their has would when who will "
    "more if no out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each"
).split()
ODD = ["naïve", "façade", "Ωμέγα", "日本語", "🙂", "tab\there", "a\u00a0b", "x\u200by", "e\u0301"]


def make_docs(n, seed, tag, min_words=20, max_words=120):
    """n documents of random words, each with a unique tag word and some unicode/odd spacing."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [f"{tag}{i:04d}"]
        for _ in range(rng.randint(min_words, max_words)):
            w = rng.choice(WORDS) if rng.random() > 0.05 else rng.choice(ODD)
            words.append(w)
            if rng.random() < 0.08:
                words.append(rng.choice([".\n", ",", "  ", "\n\t", "!"]))
        docs.append(" ".join(words))
    return docs


def write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": len(d)}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def corpus(data_dir):
    """Two corpora (A: 200 docs, B: 120 docs) as JSONL, and their documents."""
    docs_a = make_docs(200, seed=1, tag="alpha")
    docs_b = make_docs(120, seed=2, tag="beta")
    return {
        "a": write_jsonl(data_dir / "a.jsonl", docs_a),
        "b": write_jsonl(data_dir / "b.jsonl", docs_b),
        "docs_a": docs_a,
        "docs_b": docs_b,
    }


@pytest.fixture(scope="session")
def spm_model(data_dir, corpus):
    from megatron_outeff.data.tokenizer_training import train_sentencepiece

    return train_sentencepiece([corpus["a"], corpus["b"]], str(data_dir / "tok" / "spm"), vocab_size=400, num_threads=1)


@pytest.fixture(scope="session")
def hf_tokenizer_json(data_dir, corpus):
    """A tiny OPT-style byte-level BPE tokenizer.json trained offline with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus["docs_a"][:50], trainer=trainer)
    path = data_dir / "hf" / "tokenizer.json"
    os.makedirs(path.parent, exist_ok=True)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def prefixes(data_dir, corpus, spm_model):
    """corpus A and B preprocessed with the sentencepiece model (workers=1: fast in-process)."""
    from megatron_outeff.data.preprocess import preprocess_corpus

    out = {}
    for name in ("a", "b"):
        prefix = str(data_dir / "idx" / name)
        preprocess_corpus(corpus[name], prefix, spm_model, progress=False)
        out[name] = prefix
    return out
