"""The on-disk checkpoint format, below both training (which writes it) and convert (which reads and
rewrites it): the directory tree, ``latest``, ``run.json``, the model files and their manifest, and the
merge / split of model-parallel shards. The whole tree, DeepSpeed's files included: README.md here.

The package's names are those of its modules' ``__all__``: ``layout`` (tags, ``latest``, run.json, train
state, RNG and rank file names, optimizer-state names), ``model_files`` (the model files and their manifest)
and ``shards`` (merge / split of tensor- and pipeline-parallel shards).
"""

from . import layout, model_files, shards
from .layout import *  # noqa: F403
from .model_files import *  # noqa: F403
from .shards import *  # noqa: F403

__all__ = [*layout.__all__, *model_files.__all__, *shards.__all__]
