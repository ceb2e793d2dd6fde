"""Which checkpoint a run resumes (issue 19 items 2 and 13): complete checkpoints are the truth when
`latest` is lost, empty, unreadable or dangling; the run fingerprint identifies data and tokenizer by
what they are, so a moved cache or another spelling of a path resumes."""

import json
import shutil

import pytest
from train_testlib import BASE, DEMO, indexed_sets, sentencepiece_corpus

from megatron_outeff.errors import OutEffError
from megatron_outeff.training.config import load_config
from megatron_outeff.training.train import train


def _cfg(ck, extra=()):
    # dropout on: the resumed steps match only if the RNG streams of the right checkpoint are restored
    return load_config(
        DEMO,
        BASE
        + [
            "train.train_iters=6",
            "checkpoint.save_interval=2",
            "checkpoint.keep_last=0",
            "model.arch_overrides={vocab_size: 256, hidden_dropout: 0.1, attention_dropout: 0.1}",
            f"checkpoint.dir={ck or 'null'}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def stopped_at_4(tmp_path_factory):
    """An uninterrupted run's losses, and a directory whose run stopped at iteration 4 (checkpoints 2, 4)."""
    out = tmp_path_factory.mktemp("stopped")
    full = [loss for _, loss in train(_cfg(None))["history"]]
    train(_cfg(out / "ck", ["train.exit_interval=4"]))
    assert (out / "ck" / "latest").read_text().strip() == "iter_0000004"
    return {"losses": full, "dir": out / "ck"}


POINTERS = {  # what happened to `latest` -> its content (None: the file is gone)
    "missing": None,
    "empty": b"",
    "whitespace": b"\n",
    "not_a_tag": b"garbage\n",
    "not_utf8": b"\xff\xfe\x00",
    "dangling": b"iter_0000009\n",
    "escaping": b"../ck\n",
}


@pytest.mark.parametrize("case", list(POINTERS))
def test_lost_latest_resumes_from_the_newest_complete_checkpoint(case, stopped_at_4, tmp_path, capsys):
    """Without a usable `latest` the same command resumes from the newest complete checkpoint (4, not the
    older 2), says so in one line, and continues the uninterrupted run's curve. It used to start over
    at step 0 (overwriting the checkpoints) or, for an empty pointer, crash with a traceback."""
    ck = tmp_path / "ck"
    shutil.copytree(stopped_at_4["dir"], ck)
    (ck / "latest").unlink()
    if POINTERS[case] is not None:
        (ck / "latest").write_bytes(POINTERS[case])
    before = (ck / "iter_0000002" / "train_state.json").read_text()
    history = train(_cfg(ck))["history"]
    assert [i for i, _ in history] == [5, 6]
    assert [x for _, x in history] == pytest.approx(stopped_at_4["losses"][4:], abs=1e-6)
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "resuming from the newest complete checkpoint" in line]
    assert len(notes) == 1 and notes[0].endswith("iter_0000004"), out[-2000:]
    assert (ck / "latest").read_text().strip() == "iter_0000006"
    assert (ck / "iter_0000002" / "train_state.json").read_text() == before  # older checkpoints untouched


def test_latest_naming_an_older_complete_checkpoint_wins(stopped_at_4, tmp_path):
    """An operator rolls back by rewriting `latest`: a pointer that names a complete checkpoint is obeyed."""
    ck = tmp_path / "ck"
    shutil.copytree(stopped_at_4["dir"], ck)
    (ck / "latest").write_text("iter_0000002\n")
    history = train(_cfg(ck))["history"]
    assert [i for i, _ in history] == [3, 4, 5, 6]
    assert [x for _, x in history] == pytest.approx(stopped_at_4["losses"][2:], abs=1e-6)


def test_incomplete_iter_directories_are_never_started_over(tmp_path):
    """`iter_*` directories that are not complete checkpoints (no train_state.json) and no complete one:
    refused with one line instead of a new run that would prune or overwrite them; nothing written."""
    ck = tmp_path / "ck"
    (ck / "iter_0000002" / "model").mkdir(parents=True)
    (ck / "run.json").write_text(json.dumps({"fingerprint": "0123456789abcdef"}))
    listing = sorted(str(p) for p in ck.rglob("*"))
    with pytest.raises(OutEffError, match=r"holds iter_0000002 without train_state.json \(not complete checkpoints\)"):
        train(_cfg(ck))
    assert sorted(str(p) for p in ck.rglob("*")) == listing


def test_unreadable_run_file_is_one_line(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "run.json").write_text("{not json")
    with pytest.raises(OutEffError, match=r"run.json is unreadable"):
        train(_cfg(ck))
    assert (ck / "run.json").read_text() == "{not json"


def test_moved_cache_and_respelled_paths_resume(tmp_path, monkeypatch):
    """The same indexed-data run, resumed with its index cache in another place, its data prefix spelled
    relative and through a symlink, and its tokenizer given as the directory holding it: resumed
    automatically (it used to be refused as another run) and equal to the uninterrupted run."""
    from megatron_outeff.data.preprocess import preprocess_corpus

    corpus = tmp_path / "corpus.jsonl"
    tok = sentencepiece_corpus(corpus, tmp_path / "tok" / "spm")
    prefix = tmp_path / "data" / "corpus"
    preprocess_corpus(str(corpus), str(prefix), tok, progress=False)
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)

    def cfg(ck, prefix, tokenizer, cache, extra=()):
        sets = indexed_sets({"tokenizer": tokenizer}, f"[{prefix}]", f"data.cache_dir={cache}", "data.split=90,10,0")
        return load_config(DEMO, BASE + sets + ["train.train_iters=4", f"checkpoint.dir={ck or 'null'}", *extra])

    full = train(cfg(None, prefix, tok, tmp_path / "cache-a"))["history"]
    first = train(cfg(tmp_path / "ck", prefix, tok, tmp_path / "cache-a", ["train.exit_interval=2"]))["history"]
    second = train(cfg(tmp_path / "ck", "alias/./corpus", "tok", "cache-b"))["history"]  # same run, other spellings
    assert [i for i, _ in second] == [3, 4]
    assert [x for _, x in first + second] == pytest.approx([x for _, x in full], abs=1e-6)
    assert (tmp_path / "cache-b").is_dir()  # the moved cache was used (rebuilt there)
