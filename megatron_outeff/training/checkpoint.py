"""Atomic, exactly-resumable checkpoints.

Layout of ``checkpoint.dir``::

    run.json                 config fingerprint + config of the run that owns this directory (written
                             once the run is built; a directory without a complete checkpoint never
                             blocks a new run, which takes it over)
    latest                   name of the newest complete checkpoint (replaced atomically, last)
    iter_0000100/            DeepSpeed's files (model, optimizer, LR scheduler, loss scaler; ZeRO shards)
        train_state.json     iteration, consumed samples, fingerprint, layout (DP, TP, PP, ZeRO stage, ...)
        rng/rank00000.safetensors   python / numpy / torch (CPU, CUDA) / megatron RNG-tracker states
        model/manifest.json  arch, attention variant, tp, pp, vocab sizes, dtype, seq_length, iteration
        model/tp00_pp00.safetensors  each model-parallel rank's weights (data-parallel rank 0 writes them;
                             gathered first under ZeRO-3): what the converter and ``checkpoint.init_from``
                             read (megatron_outeff/convert/model_files.py), no pickles
        model/fp32_master/tp00_pp00.safetensors  bf16 / fp16 training: the optimizer's fp32 master weights
                             of the same tensors (gathered over data-parallel ranks at every ZeRO stage);
                             readers prefer them
        optimizer/           Adam's moments per parameter in the model files' layout + state.json (Adam step,
                             LR schedule): what a resume on another layout reads (training/elastic.py)

A save writes everything into ``iter_XXXXXXX.tmp``, renames it to ``iter_XXXXXXX`` and only then
replaces ``latest`` (os.replace): a crash at any moment leaves the previous checkpoint as latest.
Our own state is JSON/safetensors, never pickled. (DeepSpeed's own files are torch pickles that its
checkpoint engine loads with weights_only=False; only load checkpoints you trust.)
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import elastic
from .config import Config, ConfigError, dump_config

LATEST = "latest"
RUN_FILE = "run.json"
_ITER_RE = re.compile(r"^iter_(\d{7})$")

# Test hook: SIGKILL this process in the middle of saving the checkpoint of this iteration
# (after DeepSpeed's files and part of our own are written, before the rename).
KILL_IN_SAVE_ENV = "OUTEFF_TEST_KILL_IN_SAVE"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_latest(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / LATEST
    if not path.exists():
        return None
    tag = path.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Ownership of the checkpoint directory
# --------------------------------------------------------------------------------------------------
def claim_run_dir(cfg: Config, force_resume: bool) -> bool:
    """Decide whether this run may use ``checkpoint.dir``; writes nothing (``record_run`` does, once
    the run is built). Returns True if there is a checkpoint of this run to resume from.

    The rule: a directory whose ``latest`` names a complete checkpoint belongs to the run of its
    ``run.json`` (same config fingerprint: resume; another: refused unless ``force_resume``). A
    directory holding no complete checkpoint never blocks: a new run takes it over. A non-empty
    directory without ``run.json`` is not a run directory and is refused. Raises ConfigError
    (nothing written). Collective."""
    ckpt = cfg.checkpoint.dir
    if not ckpt:
        if force_resume:
            raise ConfigError("--resume needs checkpoint.dir")
        return False
    decision = [None]
    if dist.get_rank() == 0:
        decision[0] = _decide(cfg, Path(ckpt), force_resume, dist.get_world_size())
    dist.broadcast_object_list(decision, src=0)
    error, resume = decision[0]
    if error:
        raise ConfigError(error)
    return resume


def _decide(cfg: Config, ckpt: Path, force_resume: bool, world_size: int) -> tuple[str | None, bool]:
    run_file = ckpt / RUN_FILE
    fingerprint = cfg.fingerprint()
    latest = read_latest(ckpt)
    if run_file.exists():
        theirs = json.loads(run_file.read_text()).get("fingerprint")
        if theirs != fingerprint and latest is not None and not force_resume:
            return (f"checkpoint.dir={ckpt} holds another run (config fingerprint {theirs}, this config "
                    f"{fingerprint}); use another directory, or --resume to continue it with this config", False)
    elif ckpt.exists() and any(ckpt.iterdir()):
        return (f"checkpoint.dir={ckpt} is not empty and holds no {RUN_FILE}; refusing to overwrite it", False)
    if force_resume and latest is None:
        return (f"--resume: no complete checkpoint in {ckpt}; without --resume a new run starts there", False)
    if latest is not None:
        error = elastic.check_resume(cfg, ckpt / latest, world_size)  # saved at another layout: can it resume here?
        if error:
            return error, False
    return None, latest is not None


def record_run(cfg: Config) -> None:
    """Write ``run.json`` (this run's fingerprint and config) into ``checkpoint.dir``: called once the
    model, engine and data are built and a resumed checkpoint is loaded, so a config that fails earlier
    leaves nothing behind. Collective."""
    if cfg.checkpoint.dir and dist.get_rank() == 0:
        ckpt = Path(cfg.checkpoint.dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        _write_atomic(ckpt / RUN_FILE, json.dumps({"fingerprint": cfg.fingerprint(), "config": yaml_safe(cfg)}, indent=1))
    dist.barrier()


def yaml_safe(cfg: Config):
    import yaml

    return yaml.safe_load(dump_config(cfg))


# --------------------------------------------------------------------------------------------------
# RNG state as safetensors
# --------------------------------------------------------------------------------------------------
def rng_state_tensors() -> tuple[dict, dict]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda/{i}"] = s
    for name, state in get_cuda_rng_tracker().get_states().items():
        tensors[f"megatron_tracker/{name}"] = state.cpu() if hasattr(state, "cpu") else state
    meta = {"python_version": str(py_version), "python_gauss": json.dumps(py_gauss), "numpy_name": np_name,
            "numpy_pos": str(np_pos), "numpy_has_gauss": str(np_has_gauss), "numpy_gauss": repr(float(np_gauss))}
    return tensors, meta


def set_rng_state_tensors(tensors: dict, meta: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate((int(meta["python_version"]), tuple(int(x) for x in tensors["python"].tolist()),
                     json.loads(meta["python_gauss"])))
    np.random.set_state((meta["numpy_name"], tensors["numpy"].numpy().astype(np.uint32), int(meta["numpy_pos"]),
                         int(meta["numpy_has_gauss"]), float(meta["numpy_gauss"])))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda/")),
                                           key=lambda k: int(k.split("/")[1]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    tracker = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("megatron_tracker/")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------
def save(engine, cfg: Config, iteration: int, train_state: dict) -> str:
    """Collective: every rank calls it. Returns the tag saved."""
    from safetensors.torch import save_file

    ckpt = Path(cfg.checkpoint.dir)
    tag, tmp_tag = tag_for(iteration), tag_for(iteration) + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(ckpt / tmp_tag, ignore_errors=True)  # leftovers of an interrupted save
    dist.barrier()
    engine.save_checkpoint(str(ckpt), tag=tmp_tag, client_state={}, save_latest=False)

    save_model_files(engine, cfg, iteration, ckpt / tmp_tag)
    elastic.save_optimizer_files(engine, cfg, iteration, ckpt / tmp_tag)
    (ckpt / tmp_tag / "rng").mkdir(parents=True, exist_ok=True)
    tensors, meta = rng_state_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / tmp_tag / "rng" / f"rank{rank:05d}.safetensors"),
              metadata=meta)
    if os.environ.get(KILL_IN_SAVE_ENV) == str(iteration):
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        state = dict(train_state, iteration=iteration, fingerprint=cfg.fingerprint(),
                     layout=elastic.layout(cfg, dist.get_world_size()))
        _write_atomic(ckpt / tmp_tag / "train_state.json", json.dumps(state, indent=1))
    dist.barrier()
    if rank == 0:
        final = ckpt / tag
        if final.exists():  # re-saving an iteration: never the one `latest` names (see train.py)
            shutil.rmtree(final)
        os.rename(ckpt / tmp_tag, final)
        _fsync_dir(ckpt)
        _write_atomic(ckpt / LATEST, tag + "\n")
        _fsync_dir(ckpt)
        _prune(ckpt, cfg.checkpoint.keep_last, keep=tag)
    dist.barrier()
    return tag


def save_model_files(engine, cfg: Config, iteration: int, tag_dir: Path) -> None:
    """Collective. ``tag_dir/model/``: this (tp, pp) rank's weights as safetensors (written by its
    data-parallel rank 0) and the manifest (global rank 0). Under ZeRO-3 the partitioned parameters
    are gathered around the state-dict read (every data-parallel rank takes part)."""
    from megatron.core import parallel_state as ps

    from megatron_outeff.convert.model_files import (
        DTYPE_NAMES, MASTER_SUBDIR, MODEL_SUBDIR, make_manifest, tensor_state, write_manifest, write_rank_file,
    )

    from .model import arch_config, attention_variant, unwrap

    module = engine.module
    writer = ps.get_data_parallel_rank() == 0
    master = fp32_master_weights(engine)  # collective over the data-parallel group
    state = master_state = None
    if cfg.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if writer:
                state = tensor_state(unwrap(module))
                master_state = tensor_state(unwrap(module), replace=master) if master is not None else None
    elif writer:
        state = tensor_state(unwrap(module))
        master_state = tensor_state(unwrap(module), replace=master) if master is not None else None
    model_dir = tag_dir / MODEL_SUBDIR
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if writer:
        t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        write_rank_file(model_dir, t, p, state)
        if master_state is not None:
            write_rank_file(model_dir / MASTER_SUBDIR, t, p, master_state)
    if dist.get_rank() == 0:  # global rank 0 is data-parallel rank 0 of (tp 0, pp 0): state is set
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        write_manifest(model_dir, make_manifest(
            arch=arch_config(cfg), variant=attention_variant(cfg), tp=tp, pp=pp,
            padded_vocab_size=unwrap(module).vocab_size, seq_length=cfg.data.seq_length, iteration=iteration,
            dtype=DTYPE_NAMES.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "mixed", source="training",
            fp32_master=master is not None))


def fp32_master_weights(engine) -> dict[int, torch.Tensor] | None:
    """{id(parameter): its fp32 master weight, full (this rank's TP/PP shard, gathered over data-parallel
    ranks), on the CPU} of a bf16 / fp16 DeepSpeed engine; None for fp32 training (the parameters are
    the master weights). Collective over the data-parallel group at ZeRO 1-3 (every rank calls it).

    ZeRO 1-3 (and DeepSpeed's BF16_Optimizer): ``deepspeed.utils.safe_get_full_fp32_param``.
    ZeRO-0 (FP16_Optimizer, also DeepSpeed's bf16 ZeRO-0 wrapper): the optimizer's flat fp32 groups,
    unflattened along its low-precision groups (fused) or its per-parameter fp32 copies (unfused).
    Raises RuntimeError if a trainable parameter has no master weight (an optimizer we do not know)."""
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    params = [p for p in engine.module.parameters() if p.requires_grad]
    out = {}
    if engine.zero_optimization_stage() > 0:
        for p in params:
            v = safe_get_full_fp32_param(p)
            if v is not None:
                out[id(p)] = v.detach().to("cpu", torch.float32, copy=True).reshape(
                    p.ds_shape if hasattr(p, "ds_shape") else p.shape)
    else:
        from torch._utils import _unflatten_dense_tensors

        opt = engine.optimizer
        lp_groups = getattr(opt, "fp16_groups", None) or []
        if hasattr(opt, "fp32_groups_flat"):
            hp_groups = [_unflatten_dense_tensors(flat, group) for flat, group in zip(opt.fp32_groups_flat, lp_groups)]
        else:
            hp_groups = getattr(opt, "fp32_groups", None) or []
        for group, hp in zip(lp_groups, hp_groups):
            for p, v in zip(group, hp):
                out[id(p)] = v.detach().to("cpu", torch.float32, copy=True).reshape(p.shape)
    missing = [p for p in params if id(p) not in out]
    if missing:
        raise RuntimeError(f"{len(missing)} trainable parameter(s) have no fp32 master weight in "
                           f"{type(engine.optimizer).__name__}: cannot save the trained weights")
    return out


def _prune(ckpt: Path, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in ckpt.iterdir() if p.is_dir() and _ITER_RE.match(p.name))
    for old in tags[:-keep_last]:
        if old != keep:
            shutil.rmtree(ckpt / old, ignore_errors=True)
    for p in ckpt.iterdir():  # interrupted saves
        if p.is_dir() and p.name.endswith(".tmp") and p.name.startswith("iter_"):
            shutil.rmtree(p, ignore_errors=True)


def load(engine, cfg: Config) -> dict:
    """Collective. Loads the `latest` checkpoint into the engine (model, optimizer, scheduler, loss
    scaler) and returns our train state; RNG is restored separately (``restore_rng``) right before
    the first step, after everything that might draw random numbers."""
    ckpt = Path(cfg.checkpoint.dir)
    tag = read_latest(ckpt)
    if tag is None:
        raise ConfigError(f"no complete checkpoint in {ckpt}")
    state = json.loads((ckpt / tag / "train_state.json").read_text())
    state["tag"] = tag
    if elastic.layout_changed(state, cfg, dist.get_world_size()):  # DeepSpeed's files are another layout's
        elastic.load(engine, cfg, ckpt / tag)
        state["elastic"] = True
        return state
    load_path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt / tag}")
    return state


def restore_rng(cfg: Config, tag: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(cfg.checkpoint.dir) / tag / "rng" / f"rank{dist.get_rank():05d}.safetensors"
    if not path.exists():
        raise ConfigError(f"{path} missing: the checkpoint was written with another number of ranks")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    set_rng_state_tensors(load_file(str(path)), meta)
