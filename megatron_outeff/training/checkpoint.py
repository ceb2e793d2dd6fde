"""The run's checkpoints: atomic save and exact resume at any layout, in one object (``Checkpointer``).

What a checkpoint directory holds (our files and DeepSpeed's) and what each file means:
megatron_outeff/checkpoint_format/README.md; the names come from ``megatron_outeff.checkpoint_format``.

As torchtitan's checkpointer, train.py makes one call per concern (every call collective):

    ckpt = Checkpointer(cfg, force_resume)   # may this run use checkpoint.dir, which checkpoint it
                                             # resumes, can it at this layout; nothing written
    build the model from ckpt.model_config   # at another TP a resume keeps the checkpoint's vocabulary rows
    iteration = ckpt.load(engine, data)      # resume in one call: weights and optimizer (DeepSpeed's files
                                             # at the same layout, ours via elastic.py at another), data
                                             # position, then the RNG (restored, or reseeded at another layout)
    ckpt.record_run()                        # run.json, once everything that can refuse the config has run
    if ckpt.save_due(iteration, stopping):   # the save decision
        ckpt.save(engine, iteration, data)

- Which checkpoint resumes (``resume_point``): the one ``latest`` names if it is complete, else (the
  pointer missing, empty, unreadable or naming nothing complete) the newest complete ``iter_*``
  directory, said in one line. Complete checkpoints are the truth: a directory gets its
  ``iter_XXXXXXX`` name only from the rename that ends its save, and is renamed away before it is
  deleted (``_retire``), so no crash leaves a partial directory under that name.
- ``save``: refused (TrainingDiverged) before anything is written if a weight is NaN / inf; then
  DeepSpeed's files, the model and optimizer files, RNG states and the train state into
  ``iter_XXXXXXX.tmp``, renamed to ``iter_XXXXXXX``; only then ``latest`` is replaced (os.replace) and
  older checkpoints pruned (``keep_last``): a crash at any moment leaves the previous checkpoint as
  latest, and every checkpoint kept has finite weights.
- ``init_from``: a new run's weights from a checkpoint's model files, at any TP/PP.
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
    LATEST,
    MASTER_SUBDIR,
    MODEL_SUBDIR,
    RUN_FILE,
    TRAIN_STATE,
    checkpoint_tags,
    dtype_name,
    is_partial_tag,
    latest_tag,
    load_into_model,
    make_manifest,
    partial_tag,
    read_run_file,
    read_train_state,
    rng_file,
    tag_for,
    tensor_state,
    write_latest,
    write_manifest,
    write_rank_file,
    write_run_file,
    write_train_state,
)
from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.utils.atomic import fsync_dir
from megatron_outeff.utils.finite import require_finite

from . import elastic
from .config import Config, dump_config
from .data import check_resumed_order, order_change_note
from .step import TrainingDiverged

# Test hook: SIGKILL this process while it saves the checkpoint of iteration N: "N" or "N:files" after
# DeepSpeed's files and part of ours are written, "N:renamed" after the rename (before `latest`),
# "N:latest" after `latest` (before pruning), "N:pruning" in the middle of pruning.
KILL_IN_SAVE_ENV = "OUTEFF_TEST_KILL_IN_SAVE"
RETIRED = ".retired"  # iter_XXXXXXX.retired.tmp: a complete checkpoint renamed away to be deleted


class Checkpointer:
    """One run's ``checkpoint.dir``: ownership, resume, the save decision and the save, called in the
    order of the module docstring. Every method is collective (every rank calls it)."""

    def __init__(self, cfg: Config, force_resume: bool = False):
        """Decide whether this run may use ``checkpoint.dir`` and which checkpoint it resumes, with the
        layout check (``elastic.check_resume``); writes nothing. OutEffError (one line) if refused."""
        self.cfg = cfg
        self.dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        self.tag = claim_run_dir(cfg, force_resume)  # the checkpoint to resume; None: a new run
        self.last_saved: int | None = None

    @property
    def model_config(self) -> Config:
        """The config to build the model from: at another TP a resumed run keeps the checkpoint's
        vocabulary rows (``elastic.model_config``)."""
        return elastic.model_config(self.cfg, self.dir / self.tag) if self.tag else self.cfg

    def init_weights(self, model: torch.nn.Module) -> None:
        """A new run's initial weights from ``checkpoint.init_from`` (a resumed run has its own)."""
        if self.cfg.checkpoint.init_from and self.tag is None:
            init_from(self.cfg, model)

    def load(self, engine, train_data) -> int:
        """Resume in one call; returns the iteration to continue from (0 for a new run). Weights,
        optimizer, LR schedule and loss scale from DeepSpeed's files at the layout they were written
        at, from our per-parameter files merged and split for this layout otherwise (``elastic.load``);
        then the data position; then the RNG, last, after everything that draws random numbers: every
        stream restored at the same layout, reseeded from (seed, iteration) at another (the ranks changed)."""
        from .metrics_logger import print_rank0

        if self.tag is None:
            return 0
        tag_dir = self.dir / self.tag
        state = read_train_state(tag_dir)
        iteration = state["iteration"]
        world = dist.get_world_size()
        other_layout = elastic.layout_changed(state, self.cfg, world)
        if other_layout:  # DeepSpeed's files are another layout's
            elastic.load(engine, self.cfg, tag_dir)
        else:
            load_path, _ = engine.load_checkpoint(
                str(self.dir), tag=self.tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {tag_dir}")
        train_data.load_state_dict(state["data"])
        note = order_change_note(state["data"], train_data)  # another seed, sequence length, data: said, not silent
        if note:
            print_rank0(note)
        if other_layout:  # the saved RNG streams belong to ranks that no longer exist
            elastic.reseed(self.cfg.train.seed, iteration)
            print_rank0(
                f"resumed from {tag_dir} at iteration {iteration}, saved at "
                f"{elastic.describe(state['layout'])}, now {elastic.describe(elastic.layout(self.cfg, world))}"
            )
        else:
            restore_rng(tag_dir)
            print_rank0(f"resumed from {tag_dir} at iteration {iteration}")
        self.last_saved = iteration
        return iteration

    def record_run(self) -> None:
        record_run(self.cfg)

    def save_due(self, iteration: int, stopping: bool) -> bool:
        """The save decision after step ``iteration``: every ``checkpoint.save_interval`` steps and when
        the run stops (its last step, ``train.exit_interval``, a stop signal); never without
        ``checkpoint.dir``, nor twice for one iteration (so never over the checkpoint it resumed)."""
        interval = self.cfg.checkpoint.save_interval
        return (
            self.dir is not None
            and iteration != self.last_saved
            and (stopping or bool(interval) and iteration % interval == 0)
        )

    def save(self, engine, iteration: int, train_data) -> str:
        """Save the checkpoint of ``iteration`` (``save``); returns its tag."""
        from .metrics_logger import print_rank0

        tag = save(engine, self.cfg, iteration, {"data": train_data.state_dict()})
        self.last_saved = iteration
        print_rank0(f"saved {self.dir / tag}")
        return tag

    def describe_last(self) -> str:
        """Where the run's work is, for the message that stops it."""
        if self.dir is None:
            return "nothing was saved (no checkpoint.dir)"
        if self.last_saved is None:
            return f"no checkpoint in {self.dir} yet"
        return f"{self.dir / LATEST} names {tag_for(self.last_saved)}, the last checkpoint (finite weights)"


# --------------------------------------------------------------------------------------------------
# Ownership of the checkpoint directory, and which checkpoint resumes
# --------------------------------------------------------------------------------------------------
def claim_run_dir(cfg: Config, force_resume: bool) -> str | None:
    """Decide whether this run may use ``checkpoint.dir``; writes nothing (``record_run`` does, once
    the run is built). Returns the tag of the checkpoint to resume (``resume_point``), None for a new run.

    The rule: a directory holding a complete checkpoint belongs to the run of its ``run.json`` (same
    config fingerprint: resume; another: refused unless ``force_resume``). A directory holding no
    complete checkpoint (nor an ``iter_*`` directory that is not one) never blocks: a new run takes it
    over. A non-empty directory without ``run.json`` is not a run directory and is refused. Raises
    OutEffError (nothing written). Collective."""
    ckpt = cfg.checkpoint.dir
    if not ckpt:
        if force_resume:
            raise OutEffError("--resume needs checkpoint.dir")
        return None
    decision = [None]
    if dist.get_rank() == 0:
        decision[0] = _decide(cfg, Path(ckpt), force_resume, dist.get_world_size())
    dist.broadcast_object_list(decision, src=0)
    error, tag, note = decision[0]
    if error:
        raise OutEffError(error)
    if note:
        from .metrics_logger import print_rank0

        print_rank0(note)
    return tag


def resume_point(ckpt: Path) -> tuple[str | None, str | None]:
    """(tag, note): the checkpoint a run in ``ckpt`` resumes from, and the line to print when it is not
    the one ``latest`` names. ``latest`` wins when it names a complete checkpoint (an operator may roll
    back by rewriting it); when it is missing, empty, unreadable or names no complete checkpoint, the
    newest complete one resumes. Complete: an ``iter_XXXXXXX`` directory holding ``train_state.json``.
    (None, None) when there is none."""
    if not ckpt.is_dir():
        return None, None
    complete = [t for t in checkpoint_tags(ckpt) if (ckpt / t / TRAIN_STATE).is_file()]
    try:
        named = latest_tag(ckpt)
    except (OSError, ValueError):  # ValueError: not UTF-8
        named = False
    if named in complete:
        return named, None
    if not complete:
        return None, None
    why = {None: "missing", False: "unreadable", "": "empty"}.get(named, f"{named!r}, not a complete checkpoint")
    return complete[-1], f"{ckpt / LATEST} is {why}: resuming from the newest complete checkpoint {complete[-1]}"


def _decide(cfg: Config, ckpt: Path, force_resume: bool, world_size: int) -> tuple[str | None, str | None, str | None]:
    """(error, tag to resume, note): claim_run_dir's decision, on rank 0."""
    try:
        run = read_run_file(ckpt)
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        return f"checkpoint.dir={ckpt}: {RUN_FILE} is unreadable ({' '.join(str(e).split())})", None, None
    fingerprint = cfg.fingerprint()
    tag, note = resume_point(ckpt)
    stray = checkpoint_tags(ckpt) if tag is None and ckpt.is_dir() else []
    if stray:  # a new run would overwrite or prune them
        return (
            f"checkpoint.dir={ckpt} holds {', '.join(stray)} without {TRAIN_STATE} (not complete checkpoints); "
            "refusing to start a new run over them: move them away or use another directory",
            None,
            None,
        )
    if run is not None:
        theirs = run.get("fingerprint") if isinstance(run, dict) else None
        if theirs != fingerprint and tag is not None and not force_resume:
            return (
                f"checkpoint.dir={ckpt} holds another run (config fingerprint {theirs}, this config "
                f"{fingerprint}); use another directory, or --resume to continue it with this config",
                None,
                None,
            )
    elif ckpt.exists() and any(ckpt.iterdir()):
        return f"checkpoint.dir={ckpt} is not empty and holds no {RUN_FILE}; refusing to overwrite it", None, None
    if force_resume and tag is None:
        return f"--resume: no complete checkpoint in {ckpt}; without --resume a new run starts there", None, None
    if tag is not None:
        error = elastic.check_resume(cfg, ckpt / tag, world_size)  # saved at another layout: can it resume here?
        if not error:  # a resumed change of the data order (training/data.py)
            error = check_resumed_order(read_train_state(ckpt / tag).get("data"), cfg)
        if error:
            return error, None, None
    return None, tag, note


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
    meta = {
        "python_version": str(py_version),
        "python_gauss": json.dumps(py_gauss),
        "numpy_name": np_name,
        "numpy_pos": str(np_pos),
        "numpy_has_gauss": str(np_has_gauss),
        "numpy_gauss": repr(float(np_gauss)),
    }
    return tensors, meta


def set_rng_state_tensors(tensors: dict, meta: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(
        (
            int(meta["python_version"]),
            tuple(int(x) for x in tensors["python"].tolist()),
            json.loads(meta["python_gauss"]),
        )
    )
    np.random.set_state(
        (
            meta["numpy_name"],
            tensors["numpy"].numpy().astype(np.uint32),
            int(meta["numpy_pos"]),
            int(meta["numpy_has_gauss"]),
            float(meta["numpy_gauss"]),
        )
    )
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [
            tensors[k]
            for k in sorted((k for k in tensors if k.startswith("torch_cuda/")), key=lambda k: int(k.split("/")[1]))
        ]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    tracker = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("megatron_tracker/")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------
def save(engine, cfg: Config, iteration: int, train_state: dict) -> str:
    """Collective: every rank calls it. Returns the tag saved. TrainingDiverged, with nothing written,
    if any rank's weights hold NaN / inf (``require_finite_weights``)."""
    from safetensors.torch import save_file

    require_finite_weights(engine, iteration)
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
    _test_kill(iteration, "files")
    if rank == 0:
        write_train_state(
            tmp_dir,
            dict(
                train_state,
                iteration=iteration,
                fingerprint=cfg.fingerprint(),
                layout=elastic.layout(cfg, dist.get_world_size()),
            ),
        )
    dist.barrier()
    if rank == 0:
        if (ckpt / tag).exists():  # re-saving an iteration: never the one `latest` names (Checkpointer.save_due)
            _retire(ckpt, tag)
        os.rename(tmp_dir, ckpt / tag)
        fsync_dir(ckpt)
        _test_kill(iteration, "renamed")
        write_latest(ckpt, tag)
        fsync_dir(ckpt)
        _test_kill(iteration, "latest")
        _prune(ckpt, cfg.checkpoint.keep_last, keep=tag, iteration=iteration)
    dist.barrier()
    return tag


def require_finite_weights(engine, iteration: int) -> None:
    """Collective. TrainingDiverged naming the first non-finite weight (``utils.finite.require_finite``)
    if any rank's parameters hold NaN / inf; each rank checks what it holds (under ZeRO-3 its
    partition). Such weights are never saved, so ``latest`` and every checkpoint ``keep_last`` keeps
    are finite."""
    from .model import unwrap

    message = ""
    for name, p in unwrap(engine.module).named_parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3: this rank's partition
        try:
            require_finite(local.detach(), f"weight {name} after iteration {iteration}")
        except OutEffError as e:
            message = f"{e}; not saved"
            break
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    first = next((m for m in messages if m), None)
    if first:
        raise TrainingDiverged(first)


def _test_kill(iteration: int, point: str) -> None:
    """KILL_IN_SAVE_ENV: SIGKILL this process at ``point`` of saving ``iteration`` (tests only)."""
    when = os.environ.get(KILL_IN_SAVE_ENV)
    if when and (when == f"{iteration}:{point}" or (point == "files" and when == str(iteration))):
        os.kill(os.getpid(), signal.SIGKILL)


def _retire(ckpt: Path, tag: str) -> None:
    """Delete the complete checkpoint ``tag``: first renamed to a partial tag (atomic), so that a crash
    in the middle of the deletion never leaves a part of it under a complete checkpoint's name."""
    retired = ckpt / partial_tag(tag + RETIRED)
    shutil.rmtree(retired, ignore_errors=True)
    os.rename(ckpt / tag, retired)
    fsync_dir(ckpt)
    shutil.rmtree(retired, ignore_errors=True)


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
        write_manifest(
            model_dir,
            make_manifest(
                arch=arch_config(cfg),
                variant=attention_variant(cfg),
                tp=tp,
                pp=pp,
                padded_vocab_size=unwrap(module).vocab_size,
                seq_length=cfg.data.seq_length,
                iteration=iteration,
                dtype=dtype_name(state.values()),
                source="training",
                fp32_master=master is not None,
            ),
        )


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
                out[id(p)] = (
                    v.detach()
                    .to("cpu", torch.float32, copy=True)
                    .reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                )
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
        raise RuntimeError(
            f"{len(missing)} trainable parameter(s) have no fp32 master weight in "
            f"{type(engine.optimizer).__name__}: cannot save the trained weights"
        )
    return out


def _prune(ckpt: Path, keep_last: int, keep: str, iteration: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, never ``keep`` (the one just saved,
    named by ``latest``: ``save`` writes finite weights only, so the newest finite checkpoint is always
    kept), and the leftovers of interrupted saves and deletions."""
    if keep_last > 0:
        for i, old in enumerate(t for t in checkpoint_tags(ckpt)[:-keep_last] if t != keep):
            _retire(ckpt, old)
            if i == 0:
                _test_kill(iteration, "pruning")
    for p in ckpt.iterdir():
        if p.is_dir() and (is_partial_tag(p.name) or is_partial_tag(p.name.replace(RETIRED, ""))):
            shutil.rmtree(p, ignore_errors=True)


def restore_rng(tag_dir: Path) -> None:
    """This rank's RNG streams from the checkpoint ``tag_dir`` (saved at this layout)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = rng_file(tag_dir, dist.get_rank())
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
            model,
            cfg.checkpoint.init_from,
            arch=arch_config(cfg),
            variant=attention_variant(cfg),
            seq_length=cfg.data.seq_length,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp=ps.get_tensor_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp=ps.get_pipeline_model_parallel_world_size(),
        )
    except OutEffError as e:  # the checkpoint's messages name its files, not the config key
        raise with_context("checkpoint.init_from", e) from None
    print_rank0(
        f"initialised from {cfg.checkpoint.init_from} (tp={manifest['tp']}, pp={manifest['pp']}, "
        f"iteration {manifest['iteration']}; {manifest['weights_read_text']}); fresh optimizer"
    )
    return manifest
