"""Run the Bigram-Backcopy outlier experiment: every arm trained, evaluated and reported.

    python tools/run_experiment.py --config configs/experiments/bb-sink-cpu.yaml --out OUT_DIR

Logic in megatron_outeff/evaluation/experiment.py (module doc: outputs, the claim rule).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_outeff.evaluation.experiment import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
