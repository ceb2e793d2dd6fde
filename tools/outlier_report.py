"""Outlier report (report.json, report.md, inf_norm.png, kurtosis.png, ppl.png) for one or more models.

    python tools/outlier_report.py --model vanilla=runs/a/hf --model sm1=runs/b/hf \\
        --data VALID --calib-data TRAIN --output-dir reports/cmp [--tokenizer TOK] [--block-size N]
        [--max-blocks 8] [--batch-size 8] [--num-calib-batches 4] [--calib-batch-size 8]
        [--top-k 8] [--n-sigma 6] [--skip-quant] [--device cuda]

VALID / TRAIN: megatron indexed dataset prefixes or .txt/.jsonl files / globs. All models are evaluated
on the same blocks (Hugging Face model directories, FP and W8A8 perplexity). Logic:
megatron_outeff/evaluation/report.py.
"""

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # our own per-step lines are the progress; no library bars

from megatron_outeff.utils.cli import OneLineArgumentParser, command, positive_float, positive_int, quiet_transformers  # noqa: E402


@command
def main(argv=None) -> int:
    from megatron_outeff.evaluation.report_settings import ReportSettings  # no torch: --help stays fast

    p = OneLineArgumentParser(prog="tools/outlier_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="a model directory with its label in the report (repeat for several models)",
    )
    p.add_argument("--data", required=True, help="evaluation data: indexed dataset prefix, or .txt/.jsonl files/glob")
    p.add_argument(
        "--calib-data", help="calibration data for W8A8 (paper: training data; default: --data, noted in the report)"
    )
    p.add_argument("--output-dir", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--max-blocks", type=positive_int, default=8, help="evaluation blocks (default 8)")
    default = ReportSettings()
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=default.batch_size,
        help="evaluation batch size (default %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=positive_int,
        default=default.top_k,
        help="outlier channels listed per component (default %(default)s)",
    )
    p.add_argument(
        "--n-sigma",
        type=positive_float,
        default=default.n_sigma,
        help="outlier threshold in standard deviations (default %(default)s)",
    )
    p.add_argument("--skip-quant", action="store_true", help="skip the W8A8 perplexities (faster)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    from megatron_outeff.evaluation.eval_data import add_data_arguments

    add_data_arguments(p)
    args = p.parse_args(argv)
    quiet_transformers()
    from megatron_outeff.errors import OutEffError
    from megatron_outeff.evaluation.eval_data import calibration_batches, check_data_source, eval_blocks, tokenizer_for
    from megatron_outeff.evaluation.quant_eval import check_device, check_model_dir, check_runnable
    from megatron_outeff.evaluation.report import build_report, check_out_dir, write_report

    t0 = time.time()
    check_device(args.device)
    models = {}
    for spec in args.model:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise OutEffError(f"--model {spec!r}: expected LABEL=PATH")
        if label in models:
            raise OutEffError(f"--model label {label!r} given twice")
        models[label] = path
    configs = {path: check_model_dir(path) for path in models.values()}
    vocab = {c.get("vocab_size") for c in configs.values()} - {None}
    check_out_dir(args.output_dir)
    check_data_source(args.data, "evaluation data")
    if args.calib_data:
        check_data_source(args.calib_data, "calibration data")
    tok = tokenizer_for(args.tokenizer, list(models.values()))
    block_size = min(check_runnable(path, c, args.block_size) for path, c in configs.items())
    vocab_size = min(vocab) if vocab else None

    print(f"evaluation data {args.data}", flush=True)
    data = eval_blocks(
        args.data, tok, block_size=block_size, max_blocks=args.max_blocks, vocab_size=vocab_size, json_key=args.json_key
    )
    print(f"  {data.description['blocks']} blocks x {block_size} tokens", flush=True)
    calib = None
    if not args.skip_quant:
        calib = calibration_batches(
            args.calib_data or args.data,
            tok,
            num_batches=args.num_calib_batches,
            batch_size=args.calib_batch_size,
            block_size=block_size,
            vocab_size=vocab_size,
            json_key=args.json_key,
        )
        if not args.calib_data:
            calib.description["note"] = "calibrated on the evaluation data (no --calib-data given)"
        print(f"calibration: {calib.description['batches']} batches {calib.description['batch_sizes']}", flush=True)
    command_line = ["tools/outlier_report.py", *(sys.argv[1:] if argv is None else argv)]
    settings = ReportSettings(
        batch_size=args.batch_size, top_k=args.top_k, n_sigma=args.n_sigma, skip_quant=args.skip_quant
    )
    report = build_report(
        models, data, calib, settings, device=args.device, command=command_line, log=lambda m: print(m, flush=True)
    )
    for f in write_report(report, args.output_dir):
        print(f"wrote {f}", flush=True)
    print(f"done in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
