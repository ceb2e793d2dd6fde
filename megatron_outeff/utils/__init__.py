"""Small shared helpers with no dependency on Megatron, DeepSpeed or transformers.

atomic.py        all-or-nothing output directories and files
cli.py           the command-line tools' one-line errors (exit 2) and argparse checkers
finite.py        the one non-finite (NaN / +-inf) check and its message: require_finite, count_nonfinite
tolerance.py     rounding bounds from dtype, magnitude and depth (product self-checks and tests)
yaml_loader.py   the one YAML loader: SafeLoader refusing duplicate keys, one-line errors
"""
