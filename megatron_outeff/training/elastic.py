"""Resume a checkpoint on another layout: data / tensor / pipeline parallel size and ZeRO stage.

DeepSpeed's own checkpoint files hold each rank's flat ZeRO partition of the optimizer state and
load only at the layout they were written with. Every checkpoint therefore also holds the optimizer
state per parameter, in the layout of the model files: ``iter_XXXXXXX/optimizer/`` (what each file
holds: megatron_outeff/checkpoint_format/README.md).

Full tensors (gathered over data-parallel ranks with DeepSpeed's ``safe_get_full_optimizer_state``,
fp32, zeros where a tensor has no state) under the model's own names and shapes, so the model
files' TP / PP merge and split rules (checkpoint_format ``merge_ranks`` / ``split_rank``) move them to
any layout. A resume whose layout (``layout``) differs from the checkpoint's loads: the weights
(fp32 master copies where the checkpoint has them) merged and split for this rank, set into the
module and DeepSpeed's fp32 partitions (``safe_set_full_fp32_param``); Adam's moments and step
(``safe_set_full_optimizer_state``, or the torch optimizer's state at ZeRO-0); the LR schedule and
DeepSpeed's step counters; the data position (train_state.json, as always). Not the RNG streams:
they are per rank and the ranks changed (``reseed``).

Why not DeepSpeed's universal checkpoint (ds_to_universal.py + ``load_universal``): it loads only
into ZeRO-1/2/3 optimizers (ZeRO-0, the pipeline default, has no ZeRO shards to convert); it reads
pipeline stages from DeepSpeed PipelineModule layer files, while our engine is a plain
DeepSpeedEngine around a megatron-core model (its mp_rank files number TP x PP ranks, and
megatron-core names layers per stage, so stages would collide as TP slices); its TP merge needs
slicing patterns that would restate the model files' split rules; and it is an offline conversion
to a second checkpoint of torch pickles (tried on a DP=2 ZeRO-1 checkpoint of ours, 0.19.8: it also
stops on megatron-core's None ``_extra_state`` entries). The per-parameter calls used here are the
same fragment mappings its loader writes through, at every ZeRO stage.

Supported: fp32 at ZeRO 0-3, bf16 at ZeRO 1-3 (DeepSpeed's fp32-master optimizers). Refused with one
line: fp16 (the dynamic loss scale lives only in DeepSpeed's pickles, and fp16 cannot be verified on
CPU), checkpoints without ``optimizer/`` (written before this module, or bf16 at ZeRO-0, whose
FP16_Optimizer keeps flat fp32 groups we do not map), a new tensor-parallel size that does not divide
the checkpoint's vocabulary rows. Heads / FFN / layers against TP / PP and the global batch against
micro-batch x data parallel are checked by the config as for any run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_outeff.checkpoint_format import (
    MANIFEST,
    MODEL_SUBDIR,
    MOMENTS,
    OPTIM_FORMAT,
    OPTIM_FORMAT_VERSION,
    OPTIM_STATE,
    OPTIM_SUBDIR,
    TRAIN_STATE,
    make_manifest,
    manifest_arch_variant,
    merge_ranks,
    read_manifest,
    read_model_files,
    read_train_state,
    split_rank,
    tensor_state,
    write_manifest,
    write_rank_file,
)
from megatron_outeff.errors import OutEffError, with_context

from .config import LAYOUT_KEYS, Config
from .optimizer import state_keys

# What DeepSpeed's own checkpoint files depend on: any change and they cannot be loaded.
SHARD_KEYS = ("data_parallel", "tensor_parallel", "pipeline_parallel", "zero_stage", "cpu_offload")


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------
def layout(cfg: Config, world_size: int) -> dict:
    """The run's layout (saved in train_state.json): data / tensor / pipeline parallel sizes, ZeRO
    stage, CPU offload, micro-batch size, sequence parallelism."""
    return {
        "data_parallel": cfg.data_parallel_size(world_size),
        **{key: getattr(cfg.parallel, key) for key in LAYOUT_KEYS},
    }


def describe(lay: dict) -> str:
    return (
        f"DP {lay['data_parallel']} x TP {lay['tensor_parallel']} x PP {lay['pipeline_parallel']}, "
        f"ZeRO-{lay['zero_stage']}" + (" + CPU offload" if lay.get("cpu_offload") else "")
    )


def layout_changed(train_state: dict, cfg: Config, world_size: int) -> bool:
    """Whether DeepSpeed's files of a checkpoint (its train_state.json) cannot be loaded at this layout.
    Checkpoints written before layouts were recorded count as unchanged (DeepSpeed then decides)."""
    saved = train_state.get("layout")
    now = layout(cfg, world_size)
    return saved is not None and any(saved[k] != now[k] for k in SHARD_KEYS)


def check_resume(cfg: Config, tag_dir: Path, world_size: int) -> str | None:
    """None if the checkpoint in ``tag_dir`` can be resumed at this config's layout, else the reason
    (one line). Reads only JSON; writes nothing."""
    if not (tag_dir / TRAIN_STATE).is_file():
        return None  # not a checkpoint of ours: the ownership rules and DeepSpeed decide
    state = read_train_state(tag_dir)
    if not layout_changed(state, cfg, world_size):
        return None
    saved, now = state["layout"], layout(cfg, world_size)
    where = f"checkpoint {tag_dir} (saved at {describe(saved)})"
    if cfg.precision.dtype == "fp16":
        return (
            f"{where}: resuming on another layout ({describe(now)}) supports precision.dtype fp32 and bf16, "
            "not fp16 (its loss scale is kept only in DeepSpeed's per-layout files); resume at the saved layout"
        )
    if cfg.parallel.zero_stage == 0 and cfg.precision.dtype != "fp32":
        return (
            f"parallel.zero_stage=0 with precision.dtype={cfg.precision.dtype}: resuming {where} at {describe(now)} "
            "needs DeepSpeed's fp32-master optimizers; its ZeRO-0 FP16_Optimizer keeps flat fp32 groups we do "
            "not map; expected zero_stage >= 1"
        )
    keys = state_keys(cfg)
    if keys is None:
        return (
            f"optimizer.type={cfg.optimizer.type}: resuming {where} at {describe(now)} is not supported (DeepSpeed "
            "keeps Muon's momentum in per-rank flat buffers that the per-parameter optimizer files do not map); "
            "resume at the saved layout"
        )
    if (
        cfg.optimizer.type == "orthoadam"
        and saved["tensor_parallel"] != now["tensor_parallel"]
        and max(saved["tensor_parallel"], now["tensor_parallel"]) > 1
    ):
        return (
            f"optimizer.type=orthoadam: resuming {where} at tensor_parallel={now['tensor_parallel']}: the moments "
            "of TP-split parameters live in a rotation that is block-diagonal by TP rank, and the second moment "
            "(elementwise squares) cannot be carried into another TP size's rotation; resume at "
            f"tensor_parallel={saved['tensor_parallel']} (DP, PP and ZeRO-0 changes are supported)"
        )
    if not (tag_dir / OPTIM_SUBDIR / OPTIM_STATE).is_file():
        return (
            f"{where} has no {OPTIM_SUBDIR}/{OPTIM_STATE} (per-parameter optimizer state: written by checkpoints "
            f"since elastic resume, not at bf16/fp16 ZeRO-0), so it resumes only at that layout, not at {describe(now)}"
        )
    try:
        saved_keys = tuple(json.loads((tag_dir / OPTIM_SUBDIR / OPTIM_STATE).read_text()).get("moments", MOMENTS))
    except (OSError, ValueError) as e:
        return f"{where}: {OPTIM_SUBDIR}/{OPTIM_STATE} is unreadable ({e})"
    if saved_keys != tuple(keys):
        return (
            f"{where} holds optimizer state {list(saved_keys)}, but optimizer.type={cfg.optimizer.type} keeps "
            f"{list(keys)}; resume with the checkpoint's optimizer"
        )
    try:
        rows = read_manifest(tag_dir / MODEL_SUBDIR)["padded_vocab_size"]
    except OutEffError as e:  # a reason to return, not raise: rank 0 decides here, the others wait for it
        return f"{where}: {e}"
    tp = cfg.parallel.tensor_parallel
    if rows % tp:
        return (
            f"parallel.tensor_parallel={tp}: {where} has {rows} vocabulary rows, which {tp} tensor-parallel "
            f"ranks cannot divide; expected a tensor_parallel that divides {rows}"
        )
    return None


def model_config(cfg: Config, tag_dir: Path) -> Config:
    """The config to build the model from when resuming ``tag_dir``: with ``model.vocab_size`` unset the
    vocabulary is padded for the tensor-parallel size, so a run resumed at another TP keeps the
    checkpoint's rows instead (the padding rows take part in the loss through the tied output layer)."""
    import dataclasses

    model_dir = tag_dir / MODEL_SUBDIR
    if cfg.model.vocab_size is not None or not (model_dir / MANIFEST).is_file():
        return cfg
    rows = read_manifest(model_dir)["padded_vocab_size"]
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=rows))


# --------------------------------------------------------------------------------------------------
# The optimizer behind the engine
# --------------------------------------------------------------------------------------------------
def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    from .model import unwrap

    return [(n, p) for n, p in unwrap(engine.module).named_parameters() if p.requires_grad]


def _access(engine) -> str | None:
    """How this engine's optimizer state is reached per parameter: "plain" (ZeRO-0 fp32: the client
    torch optimizer itself, state keyed by the module's parameters), "deepspeed" (ZeRO 1-3 and bf16
    ZeRO-1: DeepSpeed's fragment mappings, safe_get/safe_set_full_*), or None (DeepSpeed's
    FP16_Optimizer at bf16/fp16 ZeRO-0: flat fp32 groups, not supported)."""
    if engine.optimizer is engine.basic_optimizer:
        return "plain"
    if all(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in _trainable(engine)):
        return "deepspeed"
    return None


def _adam_step(base: torch.optim.Optimizer) -> int:
    """The optimizer's step count: equal in every state entry (one per parameter, or per flat ZeRO
    partition); 0 before the first step, and for an optimizer without one (SGD: the LR schedule's
    step count is saved beside it)."""
    steps = {float(s["step"]) for s in base.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer state entries disagree on the Adam step: {sorted(steps)}")
    return int(steps.pop()) if steps else 0


def _create_adam_state(engine, step: int, keys: tuple = MOMENTS) -> None:
    """Give every tensor the base optimizer steps an AdamW state at ``step`` with zero moments (the
    state ``keys``; SGD: only its momentum buffer, no step): the
    module's parameters at ZeRO-0, DeepSpeed's flat fp32 partitions otherwise (ZeRO-3 puts its
    sub-group partitions into the param groups only during its step), as DeepSpeed's universal
    loader does. Then link DeepSpeed's per-parameter fragments to it (done at the first step
    otherwise), so the safe_set calls write into it."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    base = engine.basic_optimizer
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    # (ZeRO-0: not the last pipeline stage's copy of the tied embedding, marked ``shared``: its gradient
    # is dropped before every step (step.py), so the optimizer never steps it and a state created here
    # would keep the resumed step count while the others advance)
    tensors = (
        list(flat)
        if flat is not None
        else [p for g in base.param_groups for p in g["params"] if not getattr(p, "shared", False)]
    )
    for t in tensors:  # each entry its own counter: torch AdamW increments it in place
        count = int(step) if isinstance(base, DeepSpeedCPUAdam) else torch.tensor(float(step), dtype=torch.float32)
        base.state[t] = {**({"step": count} if "exp_avg" in keys else {}), **{k: torch.zeros_like(t) for k in keys}}
    _link_fragments(engine)


def _link_fragments(engine) -> None:
    """Point DeepSpeed's per-parameter optimizer-state fragments (ZeRO-1/2, BF16_Optimizer) at the
    current state tensors. DeepSpeed links them once, right after stepping the first param group,
    so the later groups' fragments stay empty (0.19.8: safe_get_full_optimizer_state then raises
    "exp_avg not found in optimizer state fragment" for the no-decay group); linking again is a no-op
    otherwise (the fragments are views)."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------
def save_optimizer_files(engine, cfg: Config, iteration: int, tag_dir: Path) -> None:
    """Collective (every rank). ``tag_dir/optimizer/``: each model-parallel rank's full per-parameter
    Adam moments (written by its data-parallel rank 0), their manifests and ``state.json`` (global
    rank 0). Writes nothing for an optimizer we cannot map (``_access`` None): such a checkpoint
    resumes only at its own layout."""
    from deepspeed.utils import safe_get_full_optimizer_state
    from megatron.core import parallel_state as ps

    from .model import arch_config, attention_variant, unwrap

    access = _access(engine)
    keys = state_keys(cfg)
    if access is None or keys is None:
        return
    base = engine.basic_optimizer
    step = _adam_step(base)
    stepped = step > 0 or int(engine.global_steps) > 0  # SGD's state has no step count
    if access == "deepspeed" and stepped:
        _link_fragments(engine)
    model = unwrap(engine.module)
    writer = ps.get_data_parallel_rank() == 0
    moments = {k: {} for k in keys}
    for _, p in _trainable(engine):  # the same order on every data-parallel rank: the gathers pair up
        shape = tuple(getattr(p, "ds_shape", p.shape))
        for k in keys:
            if access == "plain":
                v = base.state.get(p, {}).get(k)
            else:
                v = safe_get_full_optimizer_state(p, k) if stepped else None  # collective over DP
            if writer:
                moments[k][id(p)] = (
                    torch.zeros(shape) if v is None else v.detach().to("cpu", torch.float32, copy=True).reshape(shape)
                )
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if writer:
        # every tensor of the rank file replaced: a parameter by its moment, anything else by zeros
        others = {
            id(v): torch.zeros(tuple(getattr(v, "ds_shape", v.shape)))
            for v in model.state_dict(keep_vars=True).values()
            if isinstance(v, torch.Tensor)
        }
        t, p_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        for k in keys:
            write_rank_file(
                tag_dir / OPTIM_SUBDIR / k, t, p_rank, tensor_state(model, replace={**others, **moments[k]})
            )
    if dist.get_rank() == 0:
        (tag_dir / OPTIM_SUBDIR).mkdir(parents=True, exist_ok=True)
        for k in keys:
            write_manifest(
                tag_dir / OPTIM_SUBDIR / k,
                make_manifest(
                    arch=arch_config(cfg),
                    variant=attention_variant(cfg),
                    tp=tp,
                    pp=pp,
                    padded_vocab_size=model.vocab_size,
                    seq_length=cfg.data.seq_length,
                    iteration=iteration,
                    dtype="fp32",
                    source=f"training optimizer {k}",
                ),
            )
        state = {
            "format": OPTIM_FORMAT,
            "format_version": OPTIM_FORMAT_VERSION,
            "optimizer": type(base).__name__,
            "moments": list(keys),
            "step": step,
            "scheduler": engine.lr_scheduler.state_dict(),
            "global_steps": int(engine.global_steps),
            "global_samples": int(engine.global_samples),
            "skipped_steps": int(engine.skipped_steps),
        }
        (tag_dir / OPTIM_SUBDIR / OPTIM_STATE).write_text(json.dumps(state, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------
def _rank_state(directory: Path, weights: str, model) -> dict[str, torch.Tensor]:
    """This rank's tensors of a model-files directory (any layout): read and checked, then merged and
    split with the model files' rules when the checkpoint's layout differs."""
    from megatron.core import parallel_state as ps

    try:
        manifest, states = read_model_files(directory, weights=weights)
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        if (manifest["tp"], manifest["pp"], manifest["padded_vocab_size"]) == (tp, pp, model.vocab_size):
            return states[(t, p)]
        arch, variant = manifest_arch_variant(manifest, str(directory))
        hf, padded = merge_ranks(
            states, arch, variant
        )  # per tensor, the variant's included (ops.variants.variant_tensors)
        return split_rank(hf, padded, arch, variant, t, tp, p, pp, model.vocab_size)
    except OutEffError as e:
        raise with_context("resuming on another layout", e) from None


def load(engine, cfg: Config, tag_dir: Path) -> dict:
    """Collective. Load a checkpoint written at another layout into this engine: weights (fp32 master
    copies where saved), Adam moments and step, LR schedule, DeepSpeed's step counters. Returns the
    checkpoint's optimizer/state.json. The caller restores the data position and reseeds."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from megatron_outeff.models.hf_opt import load_megatron_state_dict

    from .model import unwrap

    access = _access(engine)
    if access is None:  # check_resume refuses these layouts before anything is built
        raise RuntimeError(f"resuming on another layout: {type(engine.optimizer).__name__} is not supported")
    meta = json.loads((tag_dir / OPTIM_SUBDIR / OPTIM_STATE).read_text())
    if meta.get("format") != OPTIM_FORMAT or meta.get("format_version") != OPTIM_FORMAT_VERSION:
        raise OutEffError(f"{tag_dir / OPTIM_SUBDIR / OPTIM_STATE}: not a {OPTIM_FORMAT} v{OPTIM_FORMAT_VERSION} file")
    model = unwrap(engine.module)
    keys = tuple(meta.get("moments", MOMENTS))  # check_resume: the optimizer's own state_keys
    weights = _rank_state(tag_dir / MODEL_SUBDIR, "auto", model)  # fp32 master copies where the checkpoint has them
    moments = {k: _rank_state(tag_dir / OPTIM_SUBDIR / k, "model", model) for k in keys}

    # 1. The module's weights (under ZeRO-3 gathered, set, and re-partitioned from rank 0's copy).
    params = list(model.parameters())
    with torch.no_grad():
        if cfg.parallel.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                load_megatron_state_dict(model, weights)
        else:
            load_megatron_state_dict(model, weights)

    # 2. The optimizer: an AdamW state at the saved step, then every parameter's fp32 master and moments.
    _create_adam_state(engine, int(meta["step"]), keys)
    base = engine.basic_optimizer
    for name, p in _trainable(engine):
        if access == "plain":  # the parameter is its own master (step 1); the state is keyed by it
            if getattr(p, "shared", False):
                continue  # the tied embedding's last-stage copy: re-synced from the first stage, never stepped
            for k in keys:
                base.state[p][k].copy_(moments[k][name])
        else:
            safe_set_full_fp32_param(p, weights[name].to(torch.float32))
            for k in keys:
                safe_set_full_optimizer_state(p, moments[k][name].to(torch.float32), k)

    # 3. LR schedule and DeepSpeed's counters.
    engine.lr_scheduler.load_state_dict(meta["scheduler"])
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    engine.skipped_steps = meta["skipped_steps"]
    return meta


def reseed(seed: int, iteration: int) -> None:
    """After a resume on another layout: the saved RNG streams belong to ranks that no longer exist,
    so python / numpy / torch and megatron's model-parallel tracker are seeded from (seed, iteration):
    deterministic, but dropout masks differ from the uninterrupted run's."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed + iteration)
    np.random.seed(seed + iteration)
    torch.manual_seed(seed + iteration)
    model_parallel_cuda_manual_seed(seed + iteration)
