"""Run the Bigram-Backcopy outlier experiment: every arm trained, evaluated and reported.

    python tools/run_experiment.py --config configs/experiments/bb-sink-cpu.yaml --output-dir OUT_DIR [--set k=v ...]

OUT_DIR: new, empty, or this experiment's (then it continues: finished arms are kept). Logic in
megatron_outeff/evaluation/experiment.py (module doc: outputs, the claim rule).
"""
import sys

from megatron_outeff.utils.cli import OneLineArgumentParser, command, input_text_file


@command
def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=input_text_file, help="experiment YAML (configs/experiments/*.yaml)")
    parser.add_argument("--output-dir", required=True, help="output directory (new, empty, or this experiment's: continues)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment value, e.g. --set training.train.train_iters=10 (repeatable)")
    args = parser.parse_args(argv)
    from megatron_outeff.evaluation.experiment import load_experiment, run_experiment

    run_experiment(load_experiment(args.config, args.set), args.output_dir,
                   command=["run_experiment.py", *(sys.argv[1:] if argv is None else argv)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
