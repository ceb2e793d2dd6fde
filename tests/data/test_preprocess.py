"""Preprocessing into megatron indexed datasets: exact round trip, workers, atomic output, errors."""

import json
import os

import numpy
import pytest

from megatron_outeff.data.preprocess import preprocess_corpus
from megatron_outeff.data.tokenizer import load_tokenizer
from megatron_outeff.errors import OutEffError


def read_indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def leftovers(directory, name):
    return sorted(p for p in os.listdir(directory) if p.startswith(name))


@pytest.mark.parametrize("tok_kind", ["spm", "hf"])
def test_round_trip_workers(tmp_path, corpus, spm_model, hf_tokenizer_json, tok_kind):
    tok_path = spm_model if tok_kind == "spm" else hf_tokenizer_json
    tok = load_tokenizer(tok_path)
    docs = corpus["docs_a"][:60] + corpus["docs_b"][:40]
    jsonl_a = tmp_path / "part1.jsonl"
    jsonl_b = tmp_path / "part2.jsonl"
    jsonl_a.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:60]) + "\n")
    jsonl_b.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[60:]))
    prefix = str(tmp_path / "out" / "ds")
    stats = preprocess_corpus(
        str(tmp_path / "part*.jsonl"), prefix, tok_path, json_key="body", workers=2, progress=False, chunksize=4
    )
    ds, stored = read_indexed(prefix)
    assert len(ds) == len(docs) == stats.documents
    assert numpy.dtype(ds.index.dtype) == numpy.uint16
    expected = [tok.encode(d) + [tok.eod] for d in docs]
    assert stored == expected
    assert stats.tokens == sum(map(len, expected))
    assert [tok.decode(s[:-1]) for s in stored] == docs
    assert leftovers(tmp_path / "out", "ds") == ["ds.bin", "ds.idx"]


def test_txt_file_and_paragraph_modes(tmp_path, spm_model):
    tok = load_tokenizer(spm_model)
    (tmp_path / "one.txt").write_text("first para\nline two\n\n  \nsecond para\n\n\n\nthird")
    (tmp_path / "two.txt").write_text("whole file\n")
    files = [str(tmp_path / "one.txt"), str(tmp_path / "two.txt")]
    preprocess_corpus(files, str(tmp_path / "f"), tok, progress=False)
    _, stored = read_indexed(str(tmp_path / "f"))
    assert [tok.decode(s[:-1]) for s in stored] == [open(f).read() for f in files]
    preprocess_corpus(files, str(tmp_path / "p"), tok, txt_mode="paragraph", progress=False)
    _, stored = read_indexed(str(tmp_path / "p"))
    assert [tok.decode(s[:-1]) for s in stored] == ["first para\nline two", "second para", "third", "whole file"]


def test_failure_mid_way_leaves_nothing(tmp_path, corpus, spm_model):
    lines = [json.dumps({"text": d}) for d in corpus["docs_a"][:80]]
    lines.insert(70, '{"text": "truncated')
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        with pytest.raises(OutEffError, match=r"bad.jsonl:71: invalid JSON"):
            preprocess_corpus(
                str(tmp_path / "bad.jsonl"),
                str(tmp_path / "ds"),
                spm_model,
                workers=workers,
                progress=False,
                chunksize=2,
            )
        assert leftovers(tmp_path, "ds") == []


def test_overwrite(tmp_path, corpus, spm_model):
    prefix = str(tmp_path / "ds")
    preprocess_corpus(corpus["b"], prefix, spm_model, progress=False)
    with pytest.raises(OutEffError, match="output exists: .*ds.bin .*--overwrite"):
        preprocess_corpus(corpus["b"], prefix, spm_model, progress=False)
    # a failed overwrite keeps the old pair intact
    (tmp_path / "keyless.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(OutEffError):
        preprocess_corpus(str(tmp_path / "keyless.jsonl"), prefix, spm_model, overwrite=True, progress=False)
    assert len(read_indexed(prefix)[0]) == len(corpus["docs_b"])
    (tmp_path / "small.jsonl").write_text('{"text": "just one"}\n')
    preprocess_corpus(str(tmp_path / "small.jsonl"), prefix, spm_model, overwrite=True, progress=False)
    assert len(read_indexed(prefix)[0]) == 1
    assert leftovers(tmp_path, "ds") == ["ds.bin", "ds.idx"]


def test_bad_inputs(tmp_path, corpus, spm_model):
    out = str(tmp_path / "ds")
    with pytest.raises(OutEffError, match="input file not found: .*missing.jsonl"):
        preprocess_corpus(str(tmp_path / "missing.jsonl"), out, spm_model, progress=False)
    with pytest.raises(OutEffError, match="glob matches no files"):
        preprocess_corpus(str(tmp_path / "*.nothing"), out, spm_model, progress=False)
    with pytest.raises(OutEffError, match="no key 'content' .*set --json-key"):
        preprocess_corpus(corpus["a"], out, spm_model, json_key="content", progress=False)
    (tmp_path / "empty.jsonl").write_text("\n\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(OutEffError, match="empty corpus"):
        preprocess_corpus(str(tmp_path / "empty.jsonl"), out, spm_model, progress=False)
    with pytest.raises(OutEffError, match="tokenizer not found"):
        preprocess_corpus(corpus["a"], out, str(tmp_path / "nope.model"), progress=False)
    assert leftovers(tmp_path, "ds") == []


def test_cli_one_line_errors(tmp_path, corpus, spm_model, capsys):
    """The tools end bad input with exit code 2 and a single `error:` line."""
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pre = runpy.run_path(os.path.join(root, "tools", "preprocess_data.py"))
    code = pre["main"](
        ["--input", str(tmp_path / "nope.jsonl"), "--tokenizer", spm_model, "--output-prefix", str(tmp_path / "x")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input file not found") and "\n" not in err

    code = pre["main"](
        [
            "--input",
            corpus["b"],
            "--tokenizer",
            spm_model,
            "--no-progress",
            "--output-prefix",
            str(tmp_path / "x"),
            "--workers",
            "2",
        ]
    )
    assert code == 0
    assert "120 documents" in capsys.readouterr().out

    train = runpy.run_path(os.path.join(root, "tools", "train_tokenizer.py"))
    code = train["main"](
        ["--input", corpus["b"], "--output-prefix", str(tmp_path / "t"), "--vocab-size", "300", "--json-key", "nokey"]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: ")


@pytest.mark.parametrize("workers", [1, 2])
def test_documents_that_do_not_round_trip_are_counted(tmp_path, spm_model, workers, capsys):
    tok = load_tokenizer(spm_model)
    docs = ["plain text", "a\u2581b", "more plain text", "x \u2581\u2581 y"]
    lossy = [i for i, d in enumerate(docs) if tok.decode(tok.encode(d)) != d]  # the oracle: the tokenizer itself
    assert lossy == [1, 3]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stats = preprocess_corpus(str(src), str(tmp_path / "ds"), spm_model, workers=workers, progress=False, chunksize=1)
    assert (stats.documents, stats.lossy_documents, stats.first_lossy) == (4, 2, 1)
    if workers == 1:  # the tool reports them
        import runpy

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        pre = runpy.run_path(os.path.join(root, "tools", "preprocess_data.py"))
        code = pre["main"](
            ["--input", str(src), "--tokenizer", spm_model, "--no-progress", "--output-prefix", str(tmp_path / "ds2")]
        )
        assert code == 0
        assert "warning: 2 of 4 documents do not round-trip" in capsys.readouterr().out


def test_existing_file_with_glob_characters_is_taken_literally(tmp_path):
    """A file named data[1].jsonl exists: it is that file, not a glob matching nothing; a name that is no
    file is still a glob (data[12].jsonl matches data1.jsonl and data2.jsonl); one rule for every tool
    (corpus.expand_input, also behind the evaluation / export tools' check_data_source)."""
    from megatron_outeff.data.corpus import expand_inputs, iter_documents
    from megatron_outeff.evaluation.eval_data import check_data_source

    for name, text in (
        ("data[1].jsonl", "literal"),
        ("data1.jsonl", "one"),
        ("data2.jsonl", "two"),
        ("a*b?.txt", "star"),
    ):
        (tmp_path / name).write_text(json.dumps({"text": text}) + "\n" if name.endswith(".jsonl") else text)
    literal = str(tmp_path / "data[1].jsonl")
    assert expand_inputs(literal) == [literal]
    assert list(iter_documents(literal)) == ["literal"]
    assert expand_inputs(str(tmp_path / "a*b?.txt")) == [str(tmp_path / "a*b?.txt")]
    assert expand_inputs(str(tmp_path / "data[12].jsonl")) == [
        str(tmp_path / "data1.jsonl"),
        str(tmp_path / "data2.jsonl"),
    ]
    check_data_source(literal, "calibration data")  # raised "glob matches no files" before
    with pytest.raises(OutEffError, match=r"calibration data: input glob matches no files: .*data\[34\]\.jsonl"):
        check_data_source(str(tmp_path / "data[34].jsonl"), "calibration data")
