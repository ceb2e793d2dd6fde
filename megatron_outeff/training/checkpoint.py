"""Atomic, exactly-resumable checkpoints: save / load with DeepSpeed, our own state beside it.

What a checkpoint directory holds (our files and DeepSpeed's) and what each file means:
megatron_outeff/checkpoint_format/README.md; the names come from ``megatron_outeff.checkpoint_format``.

- ``claim_run_dir`` / ``record_run``: whether this run may use ``checkpoint.dir`` (run.json).
- ``save``: DeepSpeed's files, this rank's model files (``save_model_files``), RNG states and the
  train state into ``iter_XXXXXXX.tmp``, renamed to ``iter_XXXXXXX``; only then ``latest`` is replaced
  (os.replace): a crash at any moment leaves the previous checkpoint as latest.
- ``load`` / ``restore_rng``: resume from ``latest``; ``init_from``: a new run's weights from a
  checkpoint's model files, at any TP/PP.
Our own state is JSON/safetensors, never pickled. (DeepSpeed's own files are torch pickles that its
checkpoint engine loads with weights_only=False; only load checkpoints you trust.)
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_outeff.checkpoint_format import (
    MASTER_SUBDIR, MODEL_SUBDIR, RUN_FILE, TRAIN_STATE, checkpoint_tags, dtype_name, is_partial_tag,
    load_into_model, make_manifest, partial_tag, read_latest, read_run_file, read_train_state, rng_file, tag_for,
    tensor_state, write_latest, write_manifest, write_rank_file, write_run_file, write_train_state,
)
from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.utils.atomic import fsync_dir

from . import elastic
from .config import Config, dump_config
from .data import check_resumed_order

# Test hook: SIGKILL this process in the middle of saving the checkpoint of this iteration
# (after DeepSpeed's files and part of our own are written, before the rename).
KILL_IN_SAVE_ENV = "OUTEFF_TEST_KILL_IN_SAVE"


# --------------------------------------------------------------------------------------------------
# Ownership of the checkpoint directory
# --------------------------------------------------------------------------------------------------
def claim_run_dir(cfg: Config, force_resume: bool) -> bool:
    """Decide whether this run may use ``checkpoint.dir``; writes nothing (``record_run`` does, once
    the run is built). Returns True if there is a checkpoint of this run to resume from.

    The rule: a directory whose ``latest`` names a complete checkpoint belongs to the run of its
    ``run.json`` (same config fingerprint: resume; another: refused unless ``force_resume``). A
    directory holding no complete checkpoint never blocks: a new run takes it over. A non-empty
    directory without ``run.json`` is not a run directory and is refused. Raises OutEffError
    (nothing written). Collective."""
    ckpt = cfg.checkpoint.dir
    if not ckpt:
        if force_resume:
            raise OutEffError("--resume needs checkpoint.dir")
        return False
    decision = [None]
    if dist.get_rank() == 0:
        decision[0] = _decide(cfg, Path(ckpt), force_resume, dist.get_world_size())
    dist.broadcast_object_list(decision, src=0)
    error, resume = decision[0]
    if error:
        raise OutEffError(error)
    return resume


def _decide(cfg: Config, ckpt: Path, force_resume: bool, world_size: int) -> tuple[str | None, bool]:
    run = read_run_file(ckpt)
    fingerprint = cfg.fingerprint()
    latest = read_latest(ckpt)
    if run is not None:
        theirs = run.get("fingerprint")
        if theirs != fingerprint and latest is not None and not force_resume:
            return (f"checkpoint.dir={ckpt} holds another run (config fingerprint {theirs}, this config "
                    f"{fingerprint}); use another directory, or --resume to continue it with this config", False)
    elif ckpt.exists() and any(ckpt.iterdir()):
        return (f"checkpoint.dir={ckpt} is not empty and holds no {RUN_FILE}; refusing to overwrite it", False)
    if force_resume and latest is None:
        return (f"--resume: no complete checkpoint in {ckpt}; without --resume a new run starts there", False)
    if latest is not None:
        error = elastic.check_resume(cfg, ckpt / latest, world_size)  # saved at another layout: can it resume here?
        if not error and (ckpt / latest / TRAIN_STATE).is_file():  # a resumed change of the data order (training/data.py)
            error = check_resumed_order(read_train_state(ckpt / latest).get("data"), cfg)
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
        write_run_file(ckpt, cfg.fingerprint(), yaml_safe(cfg))
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
    tag = tag_for(iteration)
    tmp_dir = ckpt / partial_tag(tag)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of an interrupted save
    dist.barrier()
    engine.save_checkpoint(str(ckpt), tag=tmp_dir.name, client_state={}, save_latest=False)

    save_model_files(engine, cfg, iteration, tmp_dir)
    elastic.save_optimizer_files(engine, cfg, iteration, tmp_dir)
    tensors, meta = rng_state_tensors()
    path = rng_file(tmp_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    if os.environ.get(KILL_IN_SAVE_ENV) == str(iteration):
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        write_train_state(tmp_dir, dict(train_state, iteration=iteration, fingerprint=cfg.fingerprint(),
                                        layout=elastic.layout(cfg, dist.get_world_size())))
    dist.barrier()
    if rank == 0:
        final = ckpt / tag
        if final.exists():  # re-saving an iteration: never the one `latest` names (see train.py)
            shutil.rmtree(final)
        os.rename(tmp_dir, final)
        fsync_dir(ckpt)
        write_latest(ckpt, tag)
        fsync_dir(ckpt)
        _prune(ckpt, cfg.checkpoint.keep_last, keep=tag)
    dist.barrier()
    return tag


def save_model_files(engine, cfg: Config, iteration: int, tag_dir: Path) -> None:
    """Collective. ``tag_dir/model/``: this (tp, pp) rank's weights as safetensors (written by its
    data-parallel rank 0) and the manifest (global rank 0). Under ZeRO-3 the partitioned parameters
    are gathered around the state-dict read (every data-parallel rank takes part)."""
    from megatron.core import parallel_state as ps

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
        write_manifest(model_dir, make_manifest(
            arch=arch_config(cfg), variant=attention_variant(cfg), tp=tp, pp=pp,
            padded_vocab_size=unwrap(module).vocab_size, seq_length=cfg.data.seq_length, iteration=iteration,
            dtype=dtype_name(state.values()), source="training",
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
    for old in checkpoint_tags(ckpt)[:-keep_last]:
        if old != keep:
            shutil.rmtree(ckpt / old, ignore_errors=True)
    for p in ckpt.iterdir():  # interrupted saves
        if p.is_dir() and is_partial_tag(p.name):
            shutil.rmtree(p, ignore_errors=True)


def load(engine, cfg: Config) -> dict:
    """Collective. Loads the `latest` checkpoint into the engine (model, optimizer, scheduler, loss
    scaler) and returns our train state; RNG is restored separately (``restore_rng``) right before
    the first step, after everything that might draw random numbers."""
    ckpt = Path(cfg.checkpoint.dir)
    tag = read_latest(ckpt)
    if tag is None:
        raise OutEffError(f"no complete checkpoint in {ckpt}")
    state = read_train_state(ckpt / tag)
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

    path = rng_file(Path(cfg.checkpoint.dir) / tag, dist.get_rank())
    if not path.exists():
        raise OutEffError(f"{path} missing: the checkpoint was written with another number of ranks")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    set_rng_state_tensors(load_file(str(path)), meta)


def init_from(cfg: Config, model: torch.nn.Module) -> dict:
    """checkpoint.init_from: this rank's weights from a training or model-only checkpoint at any layout
    (fresh optimizer, iteration 0). Returns the manifest; OutEffError if the checkpoint does not fit."""
    from megatron.core import parallel_state as ps

    from .metrics_logger import print_rank0
    from .model import arch_config, attention_variant

    try:
        manifest = load_into_model(
            model, cfg.checkpoint.init_from, arch=arch_config(cfg), variant=attention_variant(cfg),
            seq_length=cfg.data.seq_length, tp_rank=ps.get_tensor_model_parallel_rank(),
            tp=ps.get_tensor_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp=ps.get_pipeline_model_parallel_world_size())
    except OutEffError as e:  # the checkpoint's messages name its files, not the config key
        raise with_context("checkpoint.init_from", e) from None
    print_rank0(f"initialised from {cfg.checkpoint.init_from} (tp={manifest['tp']}, pp={manifest['pp']}, "
                f"iteration {manifest['iteration']}; {manifest['weights_read_text']}); fresh optimizer")
    return manifest
