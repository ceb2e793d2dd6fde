"""Checks that the launcher's world agrees with the training config, before anything is written.

Two things a launcher can get wrong that the config alone cannot see:

* ``python -m megatron_outeff.training.launch_checks --world-size N --world-from WHAT --config X.yaml
  [--set a.b=c ...]``: a scheduler allocation (e.g. SLURM_NTASKS=N processes) that does not fit the
  config's layout (TP x PP must divide N; the global batch must divide by micro batch x DP). One line
  ``error: WHAT: ...`` naming the value and what was expected, exit 2; the batch script calls it
  before starting any rank. Exit 0 and no output when the layout fits.
* :func:`check_ranks_agree`: collective, right after the process group exists: every rank must have
  loaded the same config (node agents started with different files or ``--set`` values would
  otherwise build different groups and hang, or silently train different models). Raises
  OutEffError naming the first differing key and the ranks' values.
"""

from __future__ import annotations

import sys

from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.utils.cli import OneLineArgumentParser, command, input_text_file, positive_int

from .config import Config, load_config


def check_world(cfg: Config, world_size: int, world_from: str) -> int:
    """The gradient accumulation steps for world_size ranks; OutEffError prefixed with world_from."""
    try:
        return cfg.grad_accumulation_steps(world_size)
    except OutEffError as e:
        raise with_context(world_from, e) from None


def check_launch_world(cfg: Config) -> int:
    """The world size process-group initialisation will create (``launcher_world_size``: the launcher's
    WORLD_SIZE when RANK is set, else 1), checked against the layout before any rendezvous; the error
    names WORLD_SIZE when the number came from the environment. Returns the world size."""
    from megatron_outeff.megatron.parallel import launcher_world_size

    world = launcher_world_size()
    check_world(cfg, world or 1, f"WORLD_SIZE={world}" if world is not None else "")
    return world or 1


def _first_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            diff = _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if diff:
                return diff
        return None
    return None if a == b else where


def check_ranks_agree(cfg: Config) -> None:
    """Collective over the default process group. Raises OutEffError on every rank when the ranks'
    configs differ: 'config differs between ranks: <key> is <v0> on rank 0 but <v> on rank r'."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return
    mine = cfg.to_dict()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        key = _first_difference(everyone[0], theirs)
        if key:

            def value(d, key=key):
                for part in key.split("."):
                    d = d.get(part) if isinstance(d, dict) else None
                return d

            raise OutEffError(
                f"config differs between ranks (node agents started with different configs?): "
                f"{key} is {value(everyone[0])!r} on rank 0 but {value(theirs)!r} on rank {rank}"
            )


@command
def main(argv=None) -> int:
    parser = OneLineArgumentParser(description="check a launcher's world size against a training config")
    parser.add_argument("--world-size", type=positive_int, required=True, help="processes the launcher will start")
    parser.add_argument("--world-from", default="world size", help="where the number comes from, for the message")
    parser.add_argument("--config", required=True, type=input_text_file)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args, _ = parser.parse_known_args(argv)  # the trainer's other flags (--resume) are not ours
    check_world(load_config(args.config, args.set), args.world_size, args.world_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
