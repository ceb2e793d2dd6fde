"""Outlier report (report.json, report.md, inf_norm.png, kurtosis.png, ppl.png) for one or more models.

    PYTHONPATH=$PWD python tools/outlier_report.py --model vanilla=runs/a/hf --model sm1=runs/b/hf \
        --data VALID --calib-data TRAIN --out reports/cmp [--tokenizer TOK] [--block-size 512]
        [--max-blocks 8] [--batch-size 8] [--num-calib-batches 4] [--calib-batch-size 8]
        [--top-k 8] [--n-sigma 6] [--skip-quant] [--device cuda]

VALID / TRAIN: megatron indexed dataset prefixes or .txt/.jsonl files / globs. All models are evaluated
on the same blocks. Logic: megatron_outeff/evaluation/ (report.py, cli.py: report_main).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # our own per-step lines are the progress; no library bars

from megatron_outeff.evaluation.cli import report_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(report_main())
