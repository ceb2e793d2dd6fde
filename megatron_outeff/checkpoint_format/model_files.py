"""The model files of a checkpoint (``iter_XXXXXXX/model/``: per-rank safetensors + a JSON manifest,
never pickles): written with ``tensor_state``, ``write_rank_file``, ``make_manifest``,
``write_manifest``; read with every check by ``resolve_model_dir``, ``read_manifest``,
``read_model_files``. What they hold, who writes and who reads them: README.md in this package.
Every reader check raises a one-line ``OutEffError`` before anything is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.models.family import family_of
from megatron_outeff.utils.finite import require_finite
from megatron_outeff.utils.safetensors_io import load_tensors

from .layout import LATEST, MANIFEST, MASTER_SUBDIR, MODEL_SUBDIR, latest_tag, rank_file_name, tag_for

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "dtype_name",
    "expected_rank_shapes",
    "make_manifest",
    "manifest_arch_variant",
    "read_manifest",
    "read_model_files",
    "resolve_model_dir",
    "tensor_state",
    "variant_hf_shapes",
    "write_manifest",
    "write_rank_file",
]

FORMAT = "megatron_outeff.model_checkpoint"
FORMAT_VERSION = 1
_RANK_FILE_RE = re.compile(r"^tp(\d{2,})_pp(\d{2,})\.safetensors$")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(tensors: Iterable[torch.Tensor]) -> str:
    """The manifest's ``dtype`` of these weights: fp32 | fp16 | bf16 when all floating-point tensors
    share it, else "mixed"."""
    dtypes = {v.dtype for v in tensors if v.is_floating_point()}
    return DTYPE_NAMES.get(dtypes.pop(), "fp32") if len(dtypes) == 1 else "mixed"


def make_manifest(
    *,
    arch,
    variant,
    tp: int,
    pp: int,
    padded_vocab_size: int,
    dtype: str,
    seq_length: Optional[int],
    iteration: int,
    source: str,
    fp32_master: bool = False,
) -> dict:
    """The manifest.json of a checkpoint's model files; its fields: README.md in this package."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": arch.family,
        "arch": arch.to_dict(),
        "attention": variant.to_dict(),
        "tp": int(tp),
        "pp": int(pp),
        "vocab_size": int(arch.vocab_size),
        "padded_vocab_size": int(padded_vocab_size),
        "dtype": dtype,
        "seq_length": None if seq_length is None else int(seq_length),
        "iteration": int(iteration),
        "source": source,
        "files": {
            rank_file_name(t, p)[: -len(".safetensors")]: rank_file_name(t, p) for p in range(pp) for t in range(tp)
        },
        "fp32_master": MASTER_SUBDIR if fp32_master else None,
    }


def tensor_state(
    module: torch.nn.Module, replace: Optional[Mapping[int, torch.Tensor]] = None
) -> dict[str, torch.Tensor]:
    """A megatron model's tensors for a rank file: CPU copies, wrapper prefixes and _extra_state dropped.
    ``replace`` maps ``id(parameter)`` to the tensor stored in its place (the fp32 master weights)."""
    out = {}
    for k, v in module.state_dict(keep_vars=True).items():
        while k.startswith("module."):
            k = k[len("module.") :]
        if k.endswith("._extra_state") or not isinstance(v, torch.Tensor):
            continue
        if replace is not None and id(v) in replace:
            v = replace[id(v)]
        out[k] = v.detach().to("cpu", copy=True).contiguous()
    return out


def write_rank_file(model_dir: Path, tp_rank: int, pp_rank: int, state: Mapping[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / rank_file_name(tp_rank, pp_rank)
    # Each tensor its own storage (safetensors refuses shared storage, e.g. tied copies).
    save_file(
        {k: v.detach().cpu().clone().contiguous() for k, v in state.items()},
        str(path),
        metadata={"format": "pt", "tp_rank": str(tp_rank), "pp_rank": str(pp_rank)},
    )
    return path


def write_manifest(model_dir: Path, manifest: dict) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def resolve_model_dir(path, iteration: Optional[int] = None) -> Path:
    """The ``model/`` directory of a checkpoint directory (``latest`` or ``iteration``), of an
    ``iter_XXXXXXX`` directory, or the model directory itself."""
    path = Path(path)
    if not path.is_dir():
        raise OutEffError(f"{path}: no such checkpoint directory")
    if iteration is None:
        if (path / MANIFEST).is_file():
            return path
        if (path / MODEL_SUBDIR / MANIFEST).is_file():
            return path / MODEL_SUBDIR
        tag = latest_tag(path)
        if tag is None:
            raise OutEffError(
                f"{path}: no '{LATEST}' file and no {MODEL_SUBDIR}/{MANIFEST}; expected a megatron_outeff checkpoint directory"
            )
    else:
        tag = tag_for(int(iteration))
    model_dir = path / tag / MODEL_SUBDIR
    if not (path / tag).is_dir():
        raise OutEffError(f"{path}: checkpoint {tag} not found")
    if not (model_dir / MANIFEST).is_file():
        raise OutEffError(
            f"{model_dir}: no {MANIFEST} (checkpoint written before model files were added to checkpoints?)"
        )
    return model_dir


def read_manifest(model_dir: Path) -> dict:
    try:
        m = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise OutEffError(f"{model_dir / MANIFEST}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise OutEffError(f"{model_dir / MANIFEST}: not a {FORMAT} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise OutEffError(
            f"{model_dir / MANIFEST}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    for key in ("arch", "attention", "tp", "pp", "padded_vocab_size", "dtype", "iteration"):
        if key not in m:
            raise OutEffError(f"{model_dir / MANIFEST}: missing key {key!r}")
    for key in ("tp", "pp", "padded_vocab_size"):
        if not isinstance(m[key], int) or m[key] < 1:
            raise OutEffError(f"{model_dir / MANIFEST}: {key}={m[key]!r}, expected a positive integer")
    return m


def manifest_arch_variant(m: dict, where: str = "manifest"):
    from megatron_outeff.models.family import family_for_manifest
    from megatron_outeff.ops.variants import AttentionVariantConfig

    try:
        arch = family_for_manifest(m).arch.ArchConfig.from_dict(dict(m["arch"]), source=f"{where}: arch")
    except (TypeError, ValueError) as e:
        raise with_context(f"{where}: arch", e) from None
    try:
        variant = AttentionVariantConfig.from_dict(m["attention"])
    except (TypeError, ValueError) as e:
        raise with_context(f"{where}: bad attention variant", e) from None
    return arch, variant


def variant_hf_shapes(arch, variant) -> dict[str, tuple]:
    """Hugging Face names and shapes of the variant's tensors of every layer (``ops.variants.variant_tensors``
    through the architecture family's mapping: ``models.hf_opt`` / ``models.hf_llama`` ``variant_hf_shapes``)."""
    return family_of(arch).hf.variant_hf_shapes(arch, variant)


def expected_rank_shapes(
    arch, variant, tp_rank: int, tp: int, pp_rank: int, pp: int, padded_vocab: int
) -> dict[str, tuple]:
    """{megatron key: shape} of rank (tp_rank, pp_rank), derived with the mapping itself on meta tensors."""
    mapping = family_of(arch).hf
    shapes = {**mapping.hf_expected_shapes(arch), **variant_hf_shapes(arch, variant)}
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    sd = mapping.hf_state_dict_to_megatron(
        meta, arch, tp_rank, tp, pp_rank, pp, vocab_size=padded_vocab, variant=variant
    )
    return {k: tuple(v.shape) for k, v in sd.items()}


def read_model_files(model_dir, *, progress=None, weights: str = "auto") -> tuple[dict, dict]:
    """(manifest, {(tp_rank, pp_rank): state dict}) with every check done: all and only the manifest's
    ranks present, each holding exactly the tensors (names, shapes) of the manifest's architecture,
    variant and layout, all finite.

    weights: "auto" reads the fp32 master weights when the checkpoint has them (mixed-precision
    training), else the rank files; "model" always reads the rank files (the bf16/fp16 copies).
    The returned manifest carries ``weights_read``: "fp32_master" or "model", and ``weights_read_text``,
    a sentence saying which (progress prints it too)."""
    if weights not in ("auto", "model"):
        raise ValueError(f"weights={weights!r}: expected 'auto' or 'model'")
    model_dir = Path(model_dir)
    m = read_manifest(model_dir)
    arch, variant = manifest_arch_variant(m, str(model_dir / MANIFEST))
    tp, pp = m["tp"], m["pp"]
    try:
        family_of(arch).arch.check_parallel_layout(arch, tp, pp)
    except OutEffError as e:
        raise with_context(f"{model_dir / MANIFEST}: tp={tp}, pp={pp}", e) from None
    if m["padded_vocab_size"] < arch.vocab_size or m["padded_vocab_size"] % tp:
        raise OutEffError(
            f"{model_dir / MANIFEST}: padded_vocab_size={m['padded_vocab_size']} must be >= vocab_size="
            f"{arch.vocab_size} and divisible by tp={tp}"
        )
    master = m.get("fp32_master")
    if master is not None and master != MASTER_SUBDIR:
        raise OutEffError(f"{model_dir / MANIFEST}: fp32_master={master!r}, expected {MASTER_SUBDIR!r} or null")
    m = dict(m)
    if master and weights == "auto":
        m["weights_read"] = "fp32_master"
        m["weights_read_text"] = f"reading the fp32 master weights ({m['dtype']} training; {MASTER_SUBDIR}/)"
        states = _read_rank_dir(model_dir / MASTER_SUBDIR, m, arch, variant, progress, dtype=torch.float32)
    else:
        m["weights_read"] = "model"
        why = (
            "fp32 training"
            if m["dtype"] == "fp32"
            else "weights only, as asked"
            if master
            else "this checkpoint holds no fp32 master copy"
        )
        m["weights_read_text"] = f"reading the model weights ({m['dtype']}; {why})"
        states = _read_rank_dir(model_dir, m, arch, variant, progress)
    return m, states


def _read_rank_dir(rank_dir: Path, m: dict, arch, variant, progress, dtype: Optional[torch.dtype] = None) -> dict:
    if progress:
        progress(m["weights_read_text"])
    if not rank_dir.is_dir():
        raise OutEffError(f"{rank_dir}: no such directory (the manifest names it)")
    tp, pp = m["tp"], m["pp"]
    present = {}
    for f in rank_dir.iterdir():
        mt = _RANK_FILE_RE.match(f.name)
        if mt:
            present[(int(mt.group(1)), int(mt.group(2)))] = f
    wanted = {(t, p) for p in range(pp) for t in range(tp)}
    missing = sorted(wanted - set(present))
    if missing:
        names = [rank_file_name(t, p) for t, p in missing]
        raise OutEffError(
            f"{rank_dir}: {len(missing)} rank file(s) missing for tp={tp} x pp={pp}: {', '.join(names[:4])}"
        )
    extra = sorted(set(present) - wanted)
    if extra:
        raise OutEffError(
            f"{rank_dir}: rank file(s) {', '.join(present[k].name for k in extra[:4])} outside the manifest's "
            f"tp={tp} x pp={pp}: manifest and files disagree"
        )
    states = {}
    for i, (t, p) in enumerate(sorted(wanted, key=lambda k: (k[1], k[0]))):
        path = present[(t, p)]
        if progress:
            progress(f"reading {path.name} ({i + 1}/{len(wanted)})")
        sd = load_tensors(path)
        expected = expected_rank_shapes(arch, variant, t, tp, p, pp, m["padded_vocab_size"])
        miss = sorted(set(expected) - set(sd))
        unexp = sorted(set(sd) - set(expected))
        if miss or unexp:
            raise OutEffError(
                f"{path}: tensors do not match {arch.name} ({variant.describe()}) at tp={tp}, pp={pp}: "
                f"missing {miss[:3]}, unexpected {unexp[:3]}"
            )
        for k, shape in expected.items():
            v = sd[k]
            if tuple(v.shape) != shape:
                raise OutEffError(f"{path}: {k} has shape {tuple(v.shape)}, expected {shape}")
            if dtype is not None and v.dtype != dtype:
                raise OutEffError(f"{path}: {k} is {v.dtype}, expected {dtype} master weights")
            require_finite(v, f"{path}: {k}")
        states[(t, p)] = sd
    return states
