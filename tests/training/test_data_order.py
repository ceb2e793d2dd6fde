"""The order of the training samples (issue 19 item 3).

Sample i of the training stream depends on the data, the seed and i, never on how many steps the run
is configured for: a run extended on resume (train.train_iters raised, --resume) reads exactly the
samples an uninterrupted run of the new length reads, for every data source. A resumed change of what
defines the order is refused (data.split: it moves documents between training and validation) or
stated in the log (the others); see the training README, "Data order".
"""

import math

import pytest
import torch
from train_testlib import BASE, DEMO, indexed_corpus, indexed_sets

from megatron_outeff.data.datasets import build_gpt_datasets, build_gpt_streams
from megatron_outeff.data.tokenizer import load_tokenizer
from megatron_outeff.errors import OutEffError
from megatron_outeff.training import data as training_data
from megatron_outeff.training.config import load_config
from megatron_outeff.training.model import arch_config
from megatron_outeff.training.train import train

G = 4  # BASE's global batch
SEQ = 32  # demo-tiny's data.seq_length


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return indexed_corpus(tmp_path_factory.mktemp("order"), {"a": 24, "b": 16})


def _sources(c):
    split = "data.split=90,10,0"
    return {
        "synthetic": [],
        "bigram_backcopy": ["data.source=bigram_backcopy"],
        "indexed": indexed_sets(c, f"[{c['a']}]", split),
        "indexed_weighted_blend": indexed_sets(c, f"['0.7', {c['a']}, '0.3', {c['b']}]", split),
        "indexed_unweighted_blend": indexed_sets(c, f"[{c['a']}, {c['b']}]", split),
        "indexed_valid_paths": indexed_sets(c, f"[{c['a']}]", f"data.valid_paths=[{c['b']}]"),
    }


def _epoch_samples(corpus, name, tmp_path) -> int:
    """Samples in one epoch of a prefix's training split (90,10,0), counted by megatron itself."""
    train, _, _ = build_gpt_datasets(
        corpus[name],
        tokenizer=load_tokenizer(corpus["tokenizer"]),
        seq_length=SEQ,
        split="90,10,0",
        num_samples=(None, None, None),
        cache_dir=str(tmp_path / "count"),
    )
    return len(train)


def _steps(sets, iters, steps):
    """The tokens of the first `steps` global batches of a run configured for `iters` steps."""
    cfg = load_config(DEMO, BASE + sets + [f"train.train_iters={iters}"])
    source, _ = training_data.build_sources(cfg, vocab_size=arch_config(cfg).vocab_size, dp_rank=0, dp_size=1)
    return [torch.cat([m["tokens"] for m in source.next_global_batch()]) for _ in range(steps)]


@pytest.mark.parametrize(
    "source",
    [
        "synthetic",
        "bigram_backcopy",
        "indexed",
        "indexed_weighted_blend",
        "indexed_unweighted_blend",
        "indexed_valid_paths",
    ],
)
def test_sample_order_does_not_depend_on_the_run_length(source, corpus, tmp_path):
    sets = _sources(corpus)[source] + [f"data.cache_dir={tmp_path / 'cache'}"]
    short = 4
    if source.startswith("indexed"):  # the short run fits in fewer epochs than the long one
        per_epoch = _epoch_samples(corpus, "a", tmp_path)
        assert math.ceil(short * G / per_epoch) < math.ceil(3 * short * G / per_epoch), per_epoch
    first = _steps(sets, short, short)
    longer = _steps(sets, 3 * short, 3 * short)
    for k in range(short):
        assert torch.equal(first[k], longer[k]), f"{source}: step {k + 1} reads other samples in a longer run"


def test_streams_are_megatrons_datasets_in_the_first_epoch_and_whole_epochs_after(corpus, tmp_path):
    """The oracle is megatron's own: within one epoch the stream's samples are those of megatron's
    BlendedDataset / GPTDataset sized for them; every later epoch reads each sample of the epoch once."""
    tok = load_tokenizer(corpus["tokenizer"])
    blend = f"0.7 {corpus['a']} 0.3 {corpus['b']}"
    kw = dict(tokenizer=tok, seq_length=SEQ, split="90,10,0", seed=5)
    stream, valid, test = build_gpt_streams(blend, cache_dir=str(tmp_path / "streams"), **kw)
    assert test is None and valid is not None
    lengths = [_epoch_samples(corpus, name, tmp_path) for name in ("a", "b")]
    n = min(int(lengths[0] / 0.7 / 1.01), int(lengths[1] / 0.3 / 1.01)) - 1  # megatron's mid-level datasets: one epoch
    ref, _, _ = build_gpt_datasets(blend, num_samples=(n, 4, 1), cache_dir=str(tmp_path / "sized"), **kw)
    for i in range(n):
        assert int(stream[i]["dataset_id"]) == int(ref[i]["dataset_id"]) and torch.equal(
            stream[i]["tokens"], ref[i]["tokens"]
        ), i
    single, _, _ = build_gpt_streams(corpus["a"], cache_dir=str(tmp_path / "streams"), **kw)
    L = single.epoch_length
    epochs = [[tuple(single[e * L + j]["tokens"].tolist()) for j in range(L)] for e in range(3)]
    assert sorted(epochs[1]) == sorted(epochs[0]) == sorted(epochs[2])
    assert epochs[1] != epochs[0] and epochs[2] != epochs[1]  # each epoch in another order


def _spy_reads(monkeypatch):
    """Record the tokens of every global batch a BatchSource hands out (observation only)."""
    reads = []
    original = training_data.BatchSource.next_global_batch

    def next_global_batch(self):
        micro = original(self)
        reads.append(torch.cat([m["tokens"] for m in micro]))
        return micro

    monkeypatch.setattr(training_data.BatchSource, "next_global_batch", next_global_batch)
    return reads


@pytest.mark.parametrize("source", ["indexed", "indexed_weighted_blend"])
def test_extended_run_reads_the_samples_of_an_uninterrupted_run(source, corpus, tmp_path, monkeypatch):
    """N steps, then --resume with train.train_iters = 2N: the same samples, in the same order, as a run of
    2N steps from the start (the data crosses epochs: megatron sized by the step count shuffles them
    differently), and with a constant LR the same losses."""
    sets = _sources(corpus)[source] + [f"data.cache_dir={tmp_path / 'cache'}", "schedule.decay_style=constant"]
    n = 4
    reads = _spy_reads(monkeypatch)
    full = train(load_config(DEMO, BASE + sets + [f"train.train_iters={2 * n}"]))["history"]
    uninterrupted = list(reads)
    reads.clear()
    ck = tmp_path / "ck"
    first = train(load_config(DEMO, BASE + sets + [f"train.train_iters={n}", f"checkpoint.dir={ck}"]))["history"]
    second = train(
        load_config(DEMO, BASE + sets + [f"train.train_iters={2 * n}", f"checkpoint.dir={ck}"]), force_resume=True
    )["history"]
    assert [i for i, _ in first + second] == list(range(1, 2 * n + 1))
    assert len(reads) == len(uninterrupted) == 2 * n
    for k, (got, want) in enumerate(zip(reads, uninterrupted)):
        assert torch.equal(got, want), f"step {k + 1}: the extended run read other samples"
    assert [x for _, x in first + second] == pytest.approx([x for _, x in full], abs=1e-6)


def _files(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_resumed_split_change_is_refused_before_anything_is_written(corpus, tmp_path):
    sets = _sources(corpus)["indexed"] + [f"data.cache_dir={tmp_path / 'cache'}"]
    ck = tmp_path / "ck"
    train(load_config(DEMO, BASE + sets + ["train.train_iters=2", f"checkpoint.dir={ck}"]))
    before = _files(tmp_path)
    changed = load_config(DEMO, BASE + sets + ["train.train_iters=4", f"checkpoint.dir={ck}", "data.split=80,20,0"])
    with pytest.raises(OutEffError, match=r"data\.split.*'90,10,0'.*'80,20,0'"):
        train(changed, force_resume=True)
    assert _files(tmp_path) == before
    # an equivalent spelling of the same split is no change
    same = load_config(DEMO, BASE + sets + ["train.train_iters=3", f"checkpoint.dir={ck}", "data.split=0.9,0.1,0"])
    assert [i for i, _ in train(same, force_resume=True)["history"]] == [3]


def test_resumed_order_changes_are_stated(tmp_path, capsys):
    ck = tmp_path / "ck"
    train(load_config(DEMO, BASE + ["train.train_iters=2", f"checkpoint.dir={ck}"]))
    capsys.readouterr()
    # a longer run with a larger global batch reads on from the same position of the same order: nothing to say
    train(
        load_config(DEMO, BASE + ["train.train_iters=3", "parallel.global_batch_size=8", f"checkpoint.dir={ck}"]),
        force_resume=True,
    )
    assert "data order" not in capsys.readouterr().out
    train(
        load_config(DEMO, BASE + ["train.train_iters=4", "train.seed=7", "data.seq_length=16", f"checkpoint.dir={ck}"]),
        force_resume=True,
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if "data order" in line]
    assert len(lines) == 1, lines
    assert "train.seed 1234 -> 7" in lines[0] and "data.seq_length 32 -> 16" in lines[0] and "sample 16" in lines[0]
