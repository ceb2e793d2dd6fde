"""The names and small files of a checkpoint directory: the tags (``tag_for``; ``partial_tag`` while a
save is written), ``latest``, ``run.json``, ``train_state.json``, the RNG and rank file names.
What each file holds: README.md in this package. The JSON files are written atomically (temporary
file, fsync, rename): a reader sees the old content or the new one, never a part.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from megatron_outeff.utils.atomic import write_text_atomic

__all__ = [
    "LATEST",
    "MANIFEST",
    "MASTER_SUBDIR",
    "MODEL_SUBDIR",
    "MOMENTS",
    "OPTIM_FORMAT",
    "OPTIM_FORMAT_VERSION",
    "OPTIM_STATE",
    "OPTIM_SUBDIR",
    "RUN_FILE",
    "TRAIN_STATE",
    "checkpoint_tags",
    "is_partial_tag",
    "latest_tag",
    "partial_tag",
    "rank_file_name",
    "read_latest",
    "read_run_file",
    "read_train_state",
    "rng_file",
    "tag_for",
    "write_latest",
    "write_run_file",
    "write_train_state",
]

LATEST = "latest"
RUN_FILE = "run.json"
TRAIN_STATE = "train_state.json"
RNG_SUBDIR = "rng"
MODEL_SUBDIR = "model"
MASTER_SUBDIR = "fp32_master"
MANIFEST = "manifest.json"
OPTIM_SUBDIR = "optimizer"  # per-parameter optimizer state in the model files' layout (resume on another layout)
OPTIM_STATE = "state.json"
OPTIM_FORMAT = "megatron_outeff.optimizer_state"
OPTIM_FORMAT_VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state: optimizer/<moment>/ model-files directories
PARTIAL_SUFFIX = ".tmp"
_TAG_RE = re.compile(r"^iter_(\d{7})$")


# --------------------------------------------------------------------------------------------------
# Tags: iter_XXXXXXX (complete) and iter_XXXXXXX.tmp (a save in progress, or interrupted)
# --------------------------------------------------------------------------------------------------
def tag_for(iteration: int) -> str:
    """The directory name of the checkpoint after ``iteration`` optimizer steps: ``iter_0000100``."""
    return f"iter_{iteration:07d}"


def partial_tag(tag: str) -> str:
    """Where a save of ``tag`` is written before its rename to ``tag``."""
    return tag + PARTIAL_SUFFIX


def is_partial_tag(name: str) -> bool:
    return name.endswith(PARTIAL_SUFFIX) and _TAG_RE.match(name[: -len(PARTIAL_SUFFIX)]) is not None


def checkpoint_tags(ckpt_dir: str | Path) -> list[str]:
    """The complete checkpoints (``iter_XXXXXXX`` directories) in ``ckpt_dir``, oldest first."""
    return sorted(p.name for p in Path(ckpt_dir).iterdir() if p.is_dir() and _TAG_RE.match(p.name))


# --------------------------------------------------------------------------------------------------
# latest
# --------------------------------------------------------------------------------------------------
def latest_tag(ckpt_dir: str | Path) -> Optional[str]:
    """The tag the ``latest`` file names (whether or not that directory exists); None without the file."""
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def read_latest(ckpt_dir: str | Path) -> Optional[str]:
    """The tag of the newest complete checkpoint: what ``latest`` names if that directory exists, else None."""
    tag = latest_tag(ckpt_dir)
    return tag if tag and _TAG_RE.match(tag) and (Path(ckpt_dir) / tag).is_dir() else None


def write_latest(ckpt_dir: str | Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` (atomically; written last, after the checkpoint is complete)."""
    write_text_atomic(Path(ckpt_dir) / LATEST, tag + "\n")


# --------------------------------------------------------------------------------------------------
# run.json, train_state.json, rng/
# --------------------------------------------------------------------------------------------------
def write_run_file(ckpt_dir: str | Path, fingerprint: str, config: dict) -> None:
    """``run.json``: the fingerprint and config of the run that owns ``ckpt_dir``."""
    write_text_atomic(Path(ckpt_dir) / RUN_FILE, json.dumps({"fingerprint": fingerprint, "config": config}, indent=1))


def read_run_file(ckpt_dir: str | Path) -> Optional[dict]:
    """``run.json`` as a dict, None if there is none."""
    path = Path(ckpt_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_train_state(tag_dir: str | Path, state: dict) -> None:
    """``train_state.json``: iteration, consumed samples (the data position), config fingerprint, layout."""
    write_text_atomic(Path(tag_dir) / TRAIN_STATE, json.dumps(state, indent=1))


def read_train_state(tag_dir: str | Path) -> dict:
    return json.loads((Path(tag_dir) / TRAIN_STATE).read_text())


def rng_file(tag_dir: str | Path, rank: int) -> Path:
    """Global rank ``rank``'s RNG states: ``rng/rank00003.safetensors``."""
    return Path(tag_dir) / RNG_SUBDIR / f"rank{rank:05d}.safetensors"


def rank_file_name(tp_rank: int, pp_rank: int) -> str:
    """The model file of model-parallel rank (tp_rank, pp_rank): ``tp00_pp01.safetensors``."""
    return f"tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"
