"""Write the deployable copies of a Hugging Face model directory: OUT/fp16 (fp16 safetensors) and OUT/w8a8
(compressed-tensors int-quantized W8A8).

    python tools/export_fp16_w8a8.py MODEL_DIR --output-dir OUT --calib-data DATA [--tokenizer TOK]
        [--num-calib-batches 4] [--calib-batch-size 8] [--block-size N] [--skip-fp16] [--skip-w8a8]

DATA: a megatron indexed dataset prefix (PREFIX.bin/.idx) or .txt/.jsonl files / a glob (then a
tokenizer is needed: --tokenizer, or MODEL_DIR holding tokenizer.json / *.model). Every input is
checked before anything is written; each output directory appears complete or not at all.
Logic: megatron_outeff/quant/export.py. (A training checkpoint becomes MODEL_DIR through
tools/convert_checkpoint.py to-hf.)
"""

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # our own per-step lines are the progress; no library bars

from megatron_outeff.utils.cli import OneLineArgumentParser, command, quiet_transformers  # noqa: E402


@command
def main(argv=None) -> int:
    p = OneLineArgumentParser(prog="tools/export_fp16_w8a8.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="Hugging Face model directory (plain OPT / Llama or our remote code)")
    p.add_argument("--output-dir", required=True, help="OUT: OUT/fp16 and OUT/w8a8 must not exist or be empty")
    p.add_argument(
        "--calib-data", required=True, help="calibration data: indexed dataset prefix, or .txt/.jsonl files/glob"
    )
    p.add_argument("--skip-fp16", action="store_true", help="write only w8a8 (e.g. when activations overflow fp16)")
    p.add_argument("--skip-w8a8", action="store_true", help="write only fp16")
    from megatron_outeff.evaluation.eval_data import add_data_arguments

    add_data_arguments(p)
    args = p.parse_args(argv)
    quiet_transformers()
    from megatron_outeff.evaluation.eval_data import calibration_batches, check_data_source, tokenizer_for
    from megatron_outeff.evaluation.quant_eval import check_model_dir, check_runnable, load_hf_model
    from megatron_outeff.quant.export import check_export_dirs, check_tokenizers, export_fp16, export_w8a8

    t0 = time.time()
    targets = [n for n, skip in (("fp16", args.skip_fp16), ("w8a8", args.skip_w8a8)) if not skip]
    steps, step = 2 + len(targets), iter(range(1, 10))
    config = check_model_dir(args.model_dir)
    check_export_dirs(args.output_dir, targets)
    check_data_source(args.calib_data, "calibration data")
    tok = tokenizer_for(args.tokenizer, [args.model_dir])
    check_tokenizers(args.model_dir, args.tokenizer, config.get("vocab_size"))
    block_size = check_runnable(args.model_dir, config, args.block_size)

    print(f"[{next(step)}/{steps}] calibration data {args.calib_data}", flush=True)
    calib = calibration_batches(
        args.calib_data,
        tok,
        num_batches=args.num_calib_batches,
        batch_size=args.calib_batch_size,
        block_size=block_size,
        vocab_size=config.get("vocab_size"),
        json_key=args.json_key,
    )
    d = calib.description
    print(f"      {d['batches']} batches {d['batch_sizes']} x {d['block_size']} tokens", flush=True)
    print(f"[{next(step)}/{steps}] loading {args.model_dir}", flush=True)
    model = load_hf_model(args.model_dir, eager=False)
    out = os.path.join(args.output_dir, "fp16")
    if "fp16" in targets:
        print(
            f"[{next(step)}/{steps}] fp16: checking the weights, then running the model in fp16 on the calibration data",
            flush=True,
        )
        export_fp16(model, args.model_dir, calib.batches, out)
        print(f"      wrote {out}", flush=True)
    out = os.path.join(args.output_dir, "w8a8")
    if "w8a8" in targets:
        print(
            f"[{next(step)}/{steps}] w8a8: calibrating Linear inputs and writing compressed-tensors int-quantized",
            flush=True,
        )
        params = export_w8a8(model, args.model_dir, calib.batches, out)
        print(f"      wrote {out} ({len(params)} int8 Linear layers; LM head float)", flush=True)
    print(f"done in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
