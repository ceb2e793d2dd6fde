"""Run the Bigram-Backcopy outlier experiment: every arm (x seed) trained, evaluated and reported.

    python tools/run_experiment.py --config configs/experiments/bb-massive-cpu.yaml --output-dir OUT_DIR [--set k=v ...]

OUT_DIR: new, empty, or this experiment's (then it continues: finished runs are kept). Runs go
``jobs`` at a time, one process each. Logic in megatron_outeff/evaluation/experiment.py (module doc:
outputs, the claim rules). Exit code 2: bad input (one line, nothing written); 1: a run failed (its
log says why; the finished runs are kept and the same command retries the others).
"""

import sys

from megatron_outeff.utils.cli import OneLineArgumentParser, command, input_text_file


@command
def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", required=True, type=input_text_file, help="experiment YAML (configs/experiments/*.yaml)"
    )
    parser.add_argument(
        "--output-dir", required=True, help="output directory (new, empty, or this experiment's: continues)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an experiment value, e.g. --set training.train.train_iters=10 (repeatable)",
    )
    args = parser.parse_args(argv)
    from megatron_outeff.evaluation.experiment import ExperimentFailed, load_experiment, run_experiment

    try:
        run_experiment(
            load_experiment(args.config, args.set),
            args.output_dir,
            command=["run_experiment.py", *(sys.argv[1:] if argv is None else argv)],
        )
    except ExperimentFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
