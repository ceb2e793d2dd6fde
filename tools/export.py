"""Export a Hugging Face model directory to OUT/fp16 (fp16 safetensors) and OUT/w8a8 (compressed-tensors W8A8).

    PYTHONPATH=$PWD python tools/export.py MODEL_DIR --out OUT --calib-data DATA [--tokenizer TOK]
        [--num-calib-batches 4] [--calib-batch-size 8] [--block-size 512] [--skip-fp16] [--skip-w8a8]

DATA: a megatron indexed dataset prefix (PREFIX.bin/.idx) or .txt/.jsonl files / a glob (then a
tokenizer is needed: --tokenizer, or MODEL_DIR holding tokenizer.json / *.model).
Logic: megatron_outeff/evaluation/cli.py (export_main).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # our own per-step lines are the progress; no library bars

from megatron_outeff.evaluation.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
