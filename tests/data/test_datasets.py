"""Dataset building through megatron-core (blends, splits, checks) and the resumable sampler."""

import os
import socket

import numpy
import pytest
import torch

from megatron_outeff.data.datasets import (
    MicroBatchIterator,
    ResumableBatchSampler,
    build_gpt_datasets,
    check_indexed_dataset,
    parse_blend,
)
from megatron_outeff.data.tokenizer import load_tokenizer
from megatron_outeff.errors import OutEffError

SEQ = 32


def test_parse_blend():
    assert parse_blend("a") == (["a"], None)
    assert parse_blend(["a", "b"], weights=[1, 3]) == (["a", "b"], [1.0, 3.0])
    assert parse_blend("0.7 a 0.3 b") == (["a", "b"], [0.7, 0.3])
    assert parse_blend(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_blend((["a", "b"], [2, 1])) == (["a", "b"], [2.0, 1.0])
    with pytest.raises(OutEffError, match="2 weights for 1 prefixes"):
        parse_blend(["a"], weights=[1, 2])


def test_single_prefix_splits_are_disjoint(prefixes, spm_model, tmp_path):
    tok = load_tokenizer(spm_model)

    def build():
        return build_gpt_datasets(
            prefixes["a"],
            tokenizer=tok,
            seq_length=SEQ,
            split="80,15,5",
            num_samples=(300, 40, 10),
            cache_dir=str(tmp_path / "cache"),
            seed=7,
        )

    train, valid, test = build()
    # megatron builds whole epochs: at least the requested samples per split
    assert len(train) >= 300 and len(valid) >= 40 and len(test) >= 10
    docs = [set(numpy.unique(d.document_index).tolist()) for d in (train, valid, test)]
    assert not (docs[0] & docs[1]) and not (docs[0] & docs[2]) and not (docs[1] & docs[2])
    assert sorted(docs[0] | docs[1] | docs[2]) == list(range(200))  # 160 / 30 / 10 documents
    s = train[0]
    assert set(s) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert s["tokens"].shape == (SEQ,) and s["tokens"].dtype == torch.int64
    assert torch.equal(s["tokens"][1:], s["labels"][:-1])  # labels are tokens shifted by one
    assert int(s["tokens"].max()) < tok.vocab_size
    # the index cache went where we asked, and a rebuild hits it with identical samples
    assert any(f.endswith("document_index.npy") for f in os.listdir(tmp_path / "cache"))
    again, _, _ = build()
    assert torch.equal(again[123]["tokens"], train[123]["tokens"])


def test_blend_follows_weights(prefixes, spm_model, tmp_path):
    tok = load_tokenizer(spm_model)
    n = 1000
    train, valid, test = build_gpt_datasets(
        f"0.7 {prefixes['a']} 0.3 {prefixes['b']}",
        tokenizer=tok,
        seq_length=SEQ,
        split="90,10,0",
        num_samples=(n, 100, 0),
        cache_dir=str(tmp_path / "cache"),
        create_attention_mask=True,
    )
    assert test is None and len(train) == n
    ids = numpy.array([int(train[i]["dataset_id"]) for i in range(n)])
    assert abs((ids == 0).mean() - 0.7) < 0.01 and abs((ids == 1).mean() - 0.3) < 0.01
    # every sample of dataset 0 decodes to corpus A text, of dataset 1 to corpus B text
    for i in range(0, n, 97):
        text = tok.decode(train[i]["tokens"].tolist())
        assert ("beta" not in text) if ids[i] == 0 else ("alpha" not in text)
    s = train[0]
    assert s["attention_mask"].shape == (1, SEQ, SEQ)
    assert abs((numpy.array([int(valid[i]["dataset_id"]) for i in range(len(valid))]) == 0).mean() - 0.7) < 0.05


def test_blend_per_split(prefixes, spm_model, tmp_path):
    tok = load_tokenizer(spm_model)
    train, valid, test = build_gpt_datasets(
        train_data=prefixes["a"],
        valid_data=prefixes["b"],
        tokenizer=tok,
        seq_length=SEQ,
        num_samples=(50, None, None),
        cache_dir=str(tmp_path / "cache"),
    )
    assert test is None and len(train) >= 50 and len(valid) > 0
    assert len(numpy.unique(valid.document_index)) == 120  # the whole of corpus B


def test_bad_dataset_inputs(prefixes, spm_model, hf_tokenizer_json, tmp_path):
    tok = load_tokenizer(spm_model)
    missing = str(tmp_path / "nothere")
    with pytest.raises(OutEffError, match=r"dataset prefix '.*nothere': missing .*nothere.bin and"):
        build_gpt_datasets(missing, tokenizer=tok, seq_length=SEQ, cache_dir=str(tmp_path))
    from megatron.core.tokenizers import MegatronTokenizerBase

    assert isinstance(tok, MegatronTokenizerBase)  # registered virtual subclass
    small = load_tokenizer(hf_tokenizer_json)  # 320 ids < the 400 of the data's tokenizer
    with pytest.raises(OutEffError, match="holds token id .* vocab size is 320"):
        check_indexed_dataset(prefixes["a"], small)
    with pytest.raises(OutEffError, match="gives the test split 0 of the 200 documents"):
        build_gpt_datasets(
            prefixes["a"],
            tokenizer=tok,
            seq_length=SEQ,
            split="969,30,1",
            num_samples=(10, 10, 10),
            cache_dir=str(tmp_path),
        )
    with pytest.raises(OutEffError, match="needs num_samples"):
        build_gpt_datasets(
            [prefixes["a"], prefixes["b"]], weights=[1, 1], tokenizer=tok, seq_length=SEQ, cache_dir=str(tmp_path)
        )


def test_resumable_sampler(prefixes, spm_model, tmp_path):
    tok = load_tokenizer(spm_model)
    train, _, _ = build_gpt_datasets(
        prefixes["b"],
        tokenizer=tok,
        seq_length=SEQ,
        split="1,0,0",
        num_samples=(64, None, None),
        cache_dir=str(tmp_path / "cache"),
    )
    it = MicroBatchIterator(train, micro_batch_size=4)
    for _ in range(5):
        next(it)
    state = it.state_dict()
    assert state == {"consumed_samples": 20}
    expected = [next(it) for _ in range(3)]
    fresh = MicroBatchIterator(train, micro_batch_size=4)
    fresh.load_state_dict(state)
    for want in expected:
        got = next(fresh)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert got["tokens"].shape == (4, SEQ)

    # data-parallel ranks take disjoint slices of each global batch; state is global
    r0 = ResumableBatchSampler(64, 4, data_parallel_rank=0, data_parallel_size=2)
    r1 = ResumableBatchSampler(64, 4, data_parallel_rank=1, data_parallel_size=2)
    b0, b1 = next(iter(r0)), next(iter(r1))
    assert b0 == [0, 1, 2, 3] and b1 == [4, 5, 6, 7] and r0.state_dict()["consumed_samples"] == 8
    assert len(list(iter(ResumableBatchSampler(10, 4)))) == 2  # no partial batch
    looped = ResumableBatchSampler(10, 4, consumed_samples=8, loop=True)
    assert next(iter(looped)) == [8, 9, 0, 1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_with_process_group(prefixes, spm_model, tmp_path):
    """megatron's rank-0-first/barrier path (gloo, world size 1) gives the same samples."""
    import torch.distributed as dist

    tok = load_tokenizer(spm_model)
    kwargs = dict(tokenizer=tok, seq_length=SEQ, split="90,10,0", num_samples=(200, 20, 0), seed=3)
    data = f"0.5 {prefixes['a']} 0.5 {prefixes['b']}"
    ref, _, _ = build_gpt_datasets(data, cache_dir=str(tmp_path / "c1"), **kwargs)
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        train, valid, _ = build_gpt_datasets(data, cache_dir=str(tmp_path / "c2"), **kwargs)
    finally:
        dist.destroy_process_group()
    assert len(train) == len(ref) == 200  # a BlendedDataset has exactly the requested size
    for i in (0, 57, 199):
        assert torch.equal(train[i]["tokens"], ref[i]["tokens"])


def _rank_worker(rank, world, init_file, data, cache_dir, spm_model, result_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = load_tokenizer(spm_model)
        train, valid, _ = build_gpt_datasets(
            data, tokenizer=tok, seq_length=SEQ, split="90,10,0", num_samples=(100, 10, 0), seed=5, cache_dir=cache_dir
        )
        rows = [train[i]["tokens"].tolist() for i in (0, 50, 99)] + [valid[0]["tokens"].tolist()]
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            import json

            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_build_on_two_ranks(prefixes, spm_model, tmp_path):
    """Two gloo ranks (forked: no second megatron import): rank 0 builds, rank 1 hits the cache,
    both see the same samples."""
    import json
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    data = f"0.6 {prefixes['a']} 0.4 {prefixes['b']}"
    procs = [
        ctx.Process(
            target=_rank_worker,
            args=(r, 2, str(tmp_path / "init"), data, str(tmp_path / "cache"), spm_model, str(tmp_path)),
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in range(2))
    assert r0 == r1
    # one set of index files per dataset: rank 1 reused rank 0's cache
    files = os.listdir(tmp_path / "cache")
    assert len([f for f in files if f.endswith("shuffle_index.npy")]) == 4  # 2 prefixes x 2 splits
