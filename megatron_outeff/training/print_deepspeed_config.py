"""Print the DeepSpeed JSON a training config generates: python -m megatron_outeff.training.print_deepspeed_config --config X.yaml --world-size N"""

import json
import sys

from megatron_outeff.utils.cli import OneLineArgumentParser, command, input_text_file, positive_int


@command
def main(argv=None) -> int:
    p = OneLineArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, type=input_text_file)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--world-size", type=positive_int, default=1)
    a = p.parse_args(argv)
    from .config import deepspeed_config, load_config

    print(json.dumps(deepspeed_config(load_config(a.config, a.set), a.world_size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
