"""The evaluation CLIs (tools/export.py, tools/outlier_report.py) as functions main(argv) -> exit code.

Bad input (missing model directory, a directory that is not a model, missing / too small data, a
non-empty output) ends in ONE `error: ...` line on stderr, exit code 2, and nothing written: every
input is checked before any output is created, and outputs go through a temp dir + rename.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_outeff.data.errors import DataError
from megatron_outeff.utils.atomic import atomic_output_dir
from megatron_outeff.utils.cli import OneLineArgumentParser, positive_float, positive_int

__all__ = ["export_main", "report_main"]


_Parser = OneLineArgumentParser


def _say(msg: str):
    print(msg, flush=True)


def _data_args(p: argparse.ArgumentParser, calib_default: str):
    p.add_argument("--tokenizer", help="tokenizer file/dir for raw text data and the vocab check (default: the "
                   "first model directory, if it holds tokenizer.json / *.model)")
    p.add_argument("--json-key", default="text", help="JSONL key holding the text (default: text)")
    p.add_argument("--block-size", type=positive_int, default=512, help="tokens per block (default 512, the paper's)")
    p.add_argument("--num-calib-batches", type=positive_int, default=4, help="calibration batches (paper: 4)")
    p.add_argument("--calib-batch-size", type=positive_int, default=8, help="blocks per calibration batch (paper: 8)")


def _tokenizer_for(args, model_dirs):
    """The tokenizer path to use, or None (fine for indexed data without a vocab check)."""
    if args.tokenizer:
        if not os.path.exists(args.tokenizer):
            raise DataError(f"tokenizer not found: {args.tokenizer}")
        return args.tokenizer
    for d in model_dirs:
        if any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            return str(d)
    return None


def _check_data_path(path: str, what: str):
    from .eval_data import is_indexed_prefix

    if is_indexed_prefix(path):
        return
    import glob

    if glob.has_magic(path):
        if not glob.glob(path):
            raise DataError(f"{what} glob matches no files: {path}")
    elif not os.path.isfile(path):
        raise DataError(f"{what} not found: {path} (expected a .txt/.jsonl file, a glob, or an indexed dataset prefix)")


def _quiet_libraries():
    """stderr is for the one error line: no transformers progress bars (our own [i/n] lines on stdout
    are the progress) and only its errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _run(fn, argv) -> int:
    _quiet_libraries()
    try:
        return fn(argv) or 0
    except SystemExit as e:  # argparse: --help (0) or a bad option (2, one line printed)
        return e.code if isinstance(e.code, int) else 2
    except (DataError, ValueError, FileNotFoundError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------- export
def _export(argv) -> int:
    p = _Parser(prog="tools/export.py", description="Write OUT/fp16 (fp16 safetensors, HF layout) and OUT/w8a8 "
                "(compressed-tensors int-quantized W8A8) from a Hugging Face model directory.")
    p.add_argument("model_dir", help="Hugging Face model directory (plain OPT or OutEffOPT remote code)")
    p.add_argument("--out", required=True, help="output directory; OUT/fp16 and OUT/w8a8 must not exist or be empty")
    p.add_argument("--calib-data", required=True, help="calibration data: indexed dataset prefix, or .txt/.jsonl files/glob")
    p.add_argument("--skip-fp16", action="store_true", help="write only w8a8 (e.g. when activations overflow fp16)")
    p.add_argument("--skip-w8a8", action="store_true", help="write only fp16")
    _data_args(p, "")
    args = p.parse_args(argv)
    from . import quant_eval
    from .eval_data import calibration_batches

    t0 = time.time()
    steps = 4 - args.skip_fp16 - args.skip_w8a8
    step = iter(range(1, 10))
    config = quant_eval.check_model_dir(args.model_dir)
    out = Path(args.out)
    targets = [n for n, skip in (("fp16", args.skip_fp16), ("w8a8", args.skip_w8a8)) if not skip]
    if not targets:
        raise ValueError("nothing to do: both --skip-fp16 and --skip-w8a8 given")
    for n in targets:
        d = out / n
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise ValueError(f"{d} exists and is not empty; refusing to overwrite")
    _check_data_path(args.calib_data, "calibration data")
    tok = _tokenizer_for(args, [args.model_dir])

    _say(f"[{next(step)}/{steps}] calibration data {args.calib_data}")
    calib = calibration_batches(args.calib_data, tok, num_batches=args.num_calib_batches, batch_size=args.calib_batch_size,
                                block_size=args.block_size, vocab_size=config.get("vocab_size"), json_key=args.json_key)
    d = calib.description
    _say(f"      {d['batches']} batches {d['batch_sizes']} x {d['block_size']} tokens")
    _say(f"[{next(step)}/{steps}] loading {args.model_dir}")
    model = quant_eval.load_hf_model(args.model_dir, eager=False)

    if "fp16" in targets:
        from megatron_outeff.hf.export import fp16_overflow_check, fp16_overflow_report

        _say(f"[{next(step)}/{steps}] fp16: checking the weights, then running the model in fp16 on the calibration data")
        over = fp16_overflow_report(model.state_dict())
        if over:
            raise ValueError(f"fp16 refused: {len(over)} weight(s) overflow fp16: {over[0]} (use --skip-fp16)")
        first = fp16_overflow_check(model, calib.batches)
        if first:
            raise ValueError(f"fp16 refused: {first} (use --skip-fp16 to write only w8a8)")
        _write_fp16(args.model_dir, model, out / "fp16")
        _say(f"      wrote {out / 'fp16'}")
    if "w8a8" in targets:
        from megatron_outeff.quant import export_compressed_tensors_w8a8

        _say(f"[{next(step)}/{steps}] w8a8: calibrating Linear inputs and writing compressed-tensors int-quantized")
        run = quant_eval._calibrate_fn(calib.batches)
        params = export_compressed_tensors_w8a8(model, run, out / "w8a8")
        _copy_tokenizer(args.model_dir, out / "w8a8")
        _say(f"      wrote {out / 'w8a8'} ({len(params)} int8 Linear layers; LM head float)")
    _say(f"done in {time.time() - t0:.1f} s")
    return 0


def _copy_tokenizer(src, dst):
    from megatron_outeff.hf.export import TOKENIZER_FILES

    for f in TOKENIZER_FILES:
        if (Path(src) / f).is_file():
            shutil.copyfile(Path(src) / f, Path(dst) / f)


def _write_fp16(model_dir, model, out_dir: Path):
    """fp16 copy of `model` saved in HF layout (remote-code files copied by save_pretrained), via temp + rename."""
    import copy

    with atomic_output_dir(out_dir) as tmp:
        half = copy.deepcopy(model).half()
        half.save_pretrained(tmp)
        # remote code: save_pretrained copies the modeling file and its relative imports; copy any
        # other .py of the source directory too so the directory stays self-contained.
        for f in Path(model_dir).glob("*.py"):
            if not (tmp / f.name).exists():
                shutil.copyfile(f, tmp / f.name)
        _copy_tokenizer(model_dir, tmp)


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_export, argv)


# --------------------------------------------------------------------------------------------- report
def _report(argv) -> int:
    p = _Parser(prog="tools/outlier_report.py", description="Outlier report (JSON + Markdown + PNG) of one or more "
                "Hugging Face model directories on the same evaluation data, with FP and W8A8 perplexity.")
    p.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                   help="a model directory with its label in the report (repeat for several models)")
    p.add_argument("--data", required=True, help="evaluation data: indexed dataset prefix, or .txt/.jsonl files/glob")
    p.add_argument("--calib-data", help="calibration data for W8A8 (paper: training data; default: --data, noted in the report)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--max-blocks", type=positive_int, default=8, help="evaluation blocks (default 8)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="evaluation batch size (default 8)")
    p.add_argument("--top-k", type=positive_int, default=8, help="outlier channels listed per component (default 8)")
    p.add_argument("--n-sigma", type=positive_float, default=6.0, help="outlier threshold in standard deviations (default 6)")
    p.add_argument("--skip-quant", action="store_true", help="skip the W8A8 perplexities (faster)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    _data_args(p, "")
    args = p.parse_args(argv)
    from .eval_data import calibration_batches, eval_blocks
    from .quant_eval import check_model_dir
    from .report import build_report, check_out_dir, write_report

    t0 = time.time()
    models = {}
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--model {spec!r}: expected LABEL=PATH")
        if label in models:
            raise ValueError(f"--model label {label!r} given twice")
        models[label] = path
    vocab = set()
    for label, path in models.items():
        cfg = check_model_dir(path)
        vocab.add(cfg.get("vocab_size"))
    check_out_dir(args.out)
    _check_data_path(args.data, "evaluation data")
    if args.calib_data:
        _check_data_path(args.calib_data, "calibration data")
    tok = _tokenizer_for(args, list(models.values()))
    vocab_size = min(v for v in vocab if v is not None) if any(v is not None for v in vocab) else None

    _say(f"evaluation data {args.data}")
    data = eval_blocks(args.data, tok, block_size=args.block_size, max_blocks=args.max_blocks,
                       vocab_size=vocab_size, json_key=args.json_key)
    _say(f"  {data.description['blocks']} blocks x {args.block_size} tokens")
    calib = None
    if not args.skip_quant:
        calib = calibration_batches(args.calib_data or args.data, tok, num_batches=args.num_calib_batches,
                                    batch_size=args.calib_batch_size, block_size=args.block_size,
                                    vocab_size=vocab_size, json_key=args.json_key)
        if not args.calib_data:
            calib.description["note"] = "calibrated on the evaluation data (no --calib-data given)"
        _say(f"calibration: {calib.description['batches']} batches {calib.description['batch_sizes']}")
    command = [sys.argv[0] if sys.argv and sys.argv[0].endswith("outlier_report.py") else "tools/outlier_report.py"]
    command += list(argv if argv is not None else sys.argv[1:])
    report = build_report(models, data, calib, skip_quant=args.skip_quant, batch_size=args.batch_size,
                          top_k=args.top_k, n_sigma=args.n_sigma, device=args.device, command=command, log=_say)
    written = write_report(report, args.out)
    for f in written:
        _say(f"wrote {f}")
    _say(f"done in {time.time() - t0:.1f} s")
    return 0


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    return _run(_report, argv)
