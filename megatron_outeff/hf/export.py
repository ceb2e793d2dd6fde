"""Export an OPT-architecture model (Hugging Face OPT state-dict naming) as a Hugging Face directory.

    export_hf_dir(out_dir, hf_opt_state_dict, opt_config_kwargs, variant, *, seq_length=None,
                  extra_state=None, tokenizer_dir=None, dtype=None, calibration_batches=None) -> Path

``variant``: anything ``AttentionVariantConfig.parse`` takes (megatron_outeff/ops/variants.py): a
variant, a softmax name ("vanilla" | "softmax1" | "softmax_n" | "learnable"), or a dict of its
fields. The paper's clip_alpha form (gamma = -alpha / T) is resolved here to an explicit clip_gamma
for T = ``seq_length``, the training sequence length.

Plain softmax attention (vanilla, or softmax_n with n = 0, without clip and gate) is written as a
plain ``OPTForCausalLM`` directory (model_type "opt", no remote code; ``family="llama"``: a plain
``LlamaForCausalLM``, model_type "llama"). Every other variant is
written as ``OutEffOPTForCausalLM`` remote code (``family="llama"``: ``OutEffLlamaForCausalLM``;
the shared ``remote_attention.py`` beside either): config.json with auto_map (the variant's fields as
flat keys), modeling_outeff_opt.py, configuration_outeff_opt.py, and ``exported_sources()``:
outeff_deps.py with its imports made relative, next to verbatim copies of the megatron_outeff
modules it imports (and theirs), so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without megatron_outeff.

``tokenizer_dir``: a directory whose Hugging Face tokenizer files are copied; or a sentencepiece
``.model`` / ``tokenizer.json`` file, or a directory holding our sentencepiece ``.model`` but no
tokenizer.json, which is converted with ``megatron_outeff.data.hf_tokenizer.save_hf_tokenizer``
(tokenizer.json + tokenizer_config.json that AutoTokenizer loads, encoding exactly like ours).

Extra state (``extra_state`` or inside ``hf_opt_state_dict``; i = layer index):
    model.decoder.layers.{i}.self_attn.<hf name>    every tensor of ``ops.variants.variant_tensors``

Safety: a non-empty ``out_dir`` is refused; everything is checked (variant, finiteness, key set and
shapes, fp16 range) before anything is written; files go to a temporary directory beside
``out_dir`` that is renamed into place at the end. Errors are one-line ``ValueError``s.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

from megatron_outeff.models.family import get_family
from megatron_outeff.utils.atomic import atomic_output_dir
from megatron_outeff.utils.finite import require_finite

FP16_MAX = 65504.0

# The in-package module whose megatron_outeff imports an exported directory needs (made relative).
DEPS_MODULE = "megatron_outeff.hf.outeff_deps"
_PACKAGE_IMPORT = re.compile(r"^from megatron_outeff\.\w+\.(\w+) import", re.M)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)

_DTYPES = {
    None: torch.float32,
    "fp32": torch.float32,
    "float32": torch.float32,
    torch.float32: torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    torch.float16: torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    torch.bfloat16: torch.bfloat16,
}


def _fail(msg: str):
    raise ValueError(f"export_hf_dir: {msg}")


def resolve_variant(variant, seq_length: Optional[int] = None) -> dict:
    """The Hugging Face config fields of a variant (``AttentionVariantConfig.to_dict()``, the clip_alpha
    form resolved for ``seq_length``). One-line ValueError naming a bad value."""
    from megatron_outeff.ops.variants import AttentionVariantConfig

    try:
        return AttentionVariantConfig.parse(variant).resolved(seq_length).to_dict()
    except ValueError as e:
        _fail(str(e))


def is_plain_opt(fields: Mapping) -> bool:
    """Plain softmax attention (vanilla or softmax_n with n = 0, no clip, no gate): a plain transformers OPT model."""
    from megatron_outeff.ops.variants import AttentionVariantConfig

    return AttentionVariantConfig.from_dict(fields).plain_softmax


def fp16_overflow_report(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per floating tensor with a finite value of magnitude > 65504 (inf in fp16)."""
    lines = []
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            a = t.detach().abs().float()
            a = a[torch.isfinite(a)]
            if a.numel() and float(a.max()) > FP16_MAX:
                n = int((a > FP16_MAX).sum())
                lines.append(f"{name}: max|x| = {float(a.max()):.6g} > {FP16_MAX:g} ({n} of {t.numel()} values)")
    return lines


class _FirstOverflow(Exception):
    pass


# aten ops whose -inf output can only be an overflow (additions may legitimately meet a -65504 mask).
_PRODUCT_OPS = ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "mul", "div", "_scaled_dot_product")


def _overflow_mode(module_stack: list, where: list):
    """A TorchDispatchMode that raises _FirstOverflow at the first fp16 op output holding nan or +inf
    (or -inf from a product), naming the module that ran it, the op and the shape."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float16 and t.numel():
                    bad = (
                        torch.isnan(t).any()
                        or torch.isposinf(t).any()
                        or (name.startswith(_PRODUCT_OPS) and torch.isneginf(t).any())
                    )
                    if bad:
                        finite = t[torch.isfinite(t)]
                        peak = f"max finite |x| = {float(finite.abs().max()):.6g}, " if finite.numel() else ""
                        raise _FirstOverflow(
                            f"{module_stack[-1] if module_stack else '(model)'}: aten.{name} output "
                            f"{list(t.shape)} overflows fp16 ({peak}{int((~torch.isfinite(t)).sum())} inf/nan "
                            f"value(s)) on {where[0]}"
                        )
            return out

    return Mode()


@torch.no_grad()
def fp16_overflow_check(model: torch.nn.Module, batches: Iterable) -> Optional[str]:
    """Run a copy of ``model`` in fp16 on ``batches`` and return a one-line description of the FIRST fp16
    tensor that overflows (nan, +inf, or -inf out of a product: |x| > 65504), or None if none does.

    Every intermediate fp16 holds is checked, not only module outputs: each aten op of the fp16 forward
    (a TorchDispatchMode), attention scores Q K^T included; attention runs materialised ("eager"),
    where the scores exist as a tensor. The description names the innermost module, the op, the
    shape and the batch. ``batches``: input_ids tensors [b, s] or dicts of model kwargs. On a device
    without fp16 kernels the forward raises and this raises that error.
    """
    import copy

    half = copy.deepcopy(model).to(torch.float16).eval()
    if hasattr(half, "set_attn_implementation"):
        try:
            half.set_attn_implementation("eager")
        except (ValueError, AttributeError, NotImplementedError):
            pass
    stack: list = []
    handles = []
    for n, m in half.named_modules():
        if n:
            handles.append(m.register_forward_pre_hook(lambda _m, _a, n=n: stack.append(n)))
            handles.append(m.register_forward_hook(lambda _m, _a, _o: stack.pop() and None))  # None: output kept
    where = [""]
    try:
        for i, batch in enumerate(batches):
            where[0] = f"calibration batch {i + 1}"
            stack.clear()
            with _overflow_mode(stack, where):
                half(**batch) if isinstance(batch, Mapping) else half(batch)
    except _FirstOverflow as e:
        return str(e)
    finally:
        for h in handles:
            h.remove()
    return None


def _check_finite(sd: Mapping[str, torch.Tensor]):
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            _fail(f"state-dict entry {name!r} is a {type(t).__name__}, not a tensor")
        require_finite(t, f"export_hf_dir: tensor {name!r}")


def _source_file(module_name: str) -> Path:
    return Path(inspect.getsourcefile(importlib.import_module(module_name)))


def exported_sources() -> dict[str, bytes]:
    """{file name: contents} of the project's sources a remote-code export ships beside the modeling files:
    outeff_deps.py with each ``from megatron_outeff.<package>.<module> import`` made ``from .<module>
    import``, and verbatim copies of those modules and, recursively, of the modules they import
    relatively (their siblings)."""
    from transformers.dynamic_module_utils import get_relative_imports

    deps = _source_file(DEPS_MODULE)
    text = deps.read_text(encoding="utf-8")
    files = {deps.name: _PACKAGE_IMPORT.sub(r"from .\1 import", text).encode("utf-8")}
    pending = [_source_file(m.group(0)[len("from ") : -len(" import")]) for m in _PACKAGE_IMPORT.finditer(text)]
    seen = {}
    while pending:
        path = pending.pop()
        if path.name in seen:
            if seen[path.name] != path:
                _fail(f"internal: two exported sources named {path.name}: {seen[path.name]} and {path}")
            continue
        seen[path.name] = path
        files[path.name] = path.read_bytes()
        pending.extend(path.parent / f"{name}.py" for name in get_relative_imports(path))
    return files


def _check_relative_imports_resolve(directory: Path):
    """Every `from .x import` in the written .py files names a file in the directory (what the loader needs)."""
    from transformers.dynamic_module_utils import get_relative_imports

    for f in directory.glob("*.py"):
        for rel in get_relative_imports(f):
            if not (directory / f"{rel}.py").is_file():
                _fail(f"{f.name} imports .{rel}, which is not in the exported directory")


def tokenizer_inputs(tokenizer_dir) -> tuple[list[Path], Optional[Path]]:
    """(Hugging Face tokenizer files to copy, tokenizer file to convert with save_hf_tokenizer or None) for
    ``tokenizer_dir``; one of the two is empty. ValueError whose message is the reason only (the caller names
    the input: ``export_hf_dir`` says tokenizer_dir, tools/convert_checkpoint.py says --tokenizer).

    A file (sentencepiece .model or tokenizer.json) is converted; so is a directory holding our
    sentencepiece model (tokenizer.model or exactly one *.model) but no tokenizer.json, or a
    tokenizer.json without tokenizer_config.json; any other directory's TOKENIZER_FILES are copied.
    """
    tokenizer_dir = Path(tokenizer_dir)
    if tokenizer_dir.is_file():
        if tokenizer_dir.suffix not in (".model", ".json"):
            raise ValueError("expected a sentencepiece .model or a tokenizer.json (or a tokenizer directory)")
        return [], tokenizer_dir
    if not tokenizer_dir.is_dir():
        raise ValueError("does not exist")
    source = None
    if (tokenizer_dir / "tokenizer.json").is_file():
        # without tokenizer_config.json, AutoTokenizer would pick the model type's class (OPT's adds
        # a BOS): write ours, which names the plain fast class
        source = None if (tokenizer_dir / "tokenizer_config.json").is_file() else tokenizer_dir / "tokenizer.json"
    else:
        models = (
            [tokenizer_dir / "tokenizer.model"]
            if (tokenizer_dir / "tokenizer.model").is_file()
            else sorted(tokenizer_dir.glob("*.model"))
        )
        source = models[0] if len(models) == 1 else None
    if source is not None:
        return [], source
    files = [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if not files:
        raise ValueError(f"holds none of {TOKENIZER_FILES}")
    return files, None


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _load_plain_tokenizer(directory: Path):
    """The directory's tokenizer as transformers' PreTrainedTokenizerFast, without reading config.json."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def hf_tokenizer_id_count(directory) -> int:
    """Largest token id + 1 of the Hugging Face tokenizer files in ``directory`` (added tokens included),
    as transformers loads them (PreTrainedTokenizerFast: tokenizer.json, or slow files it converts).
    OutEffError ``the tokenizer files do not load (<reason>)``: the caller names the input."""
    from megatron_outeff.errors import OutEffError

    try:
        tok = _load_plain_tokenizer(Path(directory))
    except Exception as e:  # tokenizers / transformers raise their own types
        raise OutEffError(
            f"the tokenizer files do not load ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return max(tok.get_vocab().values()) + 1


def _use_tokenizer_special_ids(model, directory: Path, what: str) -> None:
    """config and generation_config take bos / eos / pad ids from the tokenizer written in ``directory``
    (OPT's defaults 2 / 2 / 1 are another tokenizer's); the embedding's padding_idx follows. A tokenizer
    with more ids than the model's vocabulary is refused (training's refusal, naming ``what``)."""
    from transformers import GenerationConfig

    from megatron_outeff.data.tokenizer import check_vocab_fits

    try:
        tok = _load_plain_tokenizer(directory)
    except Exception as e:  # tokenizers / transformers raise their own types
        _fail(f"the tokenizer files do not load: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    check_vocab_fits(max(tok.get_vocab().values()) + 1, model.config.vocab_size, f"export_hf_dir: {what}")
    for key in SPECIAL_IDS:
        setattr(model.config, key, getattr(tok, key))
    model.generation_config = GenerationConfig.from_model_config(model.config)
    model.get_input_embeddings().padding_idx = model.config.pad_token_id


def _greedy(model, ids, mask, pad_id, n):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=pad_id,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1).double()


def _head_term_magnitude(model):
    """(hook handle, [M]): M = max over the positions the LM head sees of sum_i |h_i| |W_ji|, the sum of
    absolute values of the terms of one logit (the ``magnitude`` of megatron_outeff.utils.tolerance)."""
    head = model.get_output_embeddings()
    peak = [0.0]

    def hook(_m, args):
        h = args[0].detach().abs().reshape(-1, args[0].shape[-1])
        peak[0] = max(peak[0], float((h @ head.weight.detach().abs().t()).max()))

    return head.register_forward_pre_hook(hook), peak


def padding_check_bound(config, seq_length: int, magnitude: float) -> float:
    """The bound of the padded-vs-unpadded check: both runs compute the same real numbers (padding keys
    are masked to an exact zero probability), so in float64 they differ by rounding only, in whatever
    order each shape's kernels sum: n eps64 M (megatron_outeff.utils.tolerance), n the network's depth
    at ``seq_length`` and M the LM head's term magnitude. First order: the relative error n eps64 the
    final hidden state carries moves a logit by at most that times sum_i |h_i W_ji| <= M."""
    from megatron_outeff.utils.tolerance import network_depth, rounding_bound

    hidden = int(config.hidden_size)
    ffn = getattr(config, "ffn_dim", None) or getattr(config, "intermediate_size", None) or 4 * hidden
    return rounding_bound(
        torch.float64, max(1.0, magnitude), network_depth(hidden, ffn, int(config.num_hidden_layers), seq_length)
    )


def check_exported_dir(directory, model=None, *, plain: bool, new_tokens: int = 3, family: str = "opt") -> None:
    """Reload ``directory`` the way a user would and raise a one-line ValueError where anything disagrees:

    * ``AutoConfig`` (trust_remote_code for remote-code exports) gives the written model_type;
    * with tokenizer files: ``AutoTokenizer`` loads (trust_remote_code as the model needs: transformers 5
      reads config.json before the tokenizer files), so does ``PreTrainedTokenizerFast`` (no custom
      code, config.json not read), both encode alike, and their bos / eos / pad ids equal
      config.json's and generation_config.json's;
    * ``AutoModelForCausalLM`` (same trust_remote_code) loads every tensor equal to ``model``'s;
    * ``generate`` on a left-padded batch of two prompts of different lengths (tokenized text, or
      ids when there is no tokenizer) gives each row the greedy tokens its unpadded prompt gives.
      This is structural (padding must not change a prompt's result), so it runs on the reloaded model
      cast to float64, whatever the exported dtype, with the derived float64 bound of
      ``padding_check_bound`` (~1e-12 relative; a real padding or position bug is ~1e-2): no bound of
      one machine's fp32 kernels (AVX-512 and AVX2 sum in other orders than the scalar path). A
      differing token is accepted only where the unpadded run's two candidates are within the bound (a tie).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory = Path(directory)
    trust = None if plain else True

    def fail(msg):
        _fail(f"the exported directory does not reload consistently: {msg}")

    def first_line(e):
        return str(e).splitlines()[0] if str(e) else type(e).__name__

    try:
        cfg = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust)
    except Exception as e:
        fail(f"AutoConfig: {first_line(e)}")
    fam = get_family(family)
    want_type = fam.hf_model_type if plain else fam.remote_model_type
    if cfg.model_type != want_type:
        fail(f"AutoConfig gives model_type {cfg.model_type!r}, expected {want_type!r}")
    gen = GenerationConfig.from_pretrained(str(directory)) if (directory / "generation_config.json").is_file() else None
    tok = None
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust)
            plain_tok = _load_plain_tokenizer(directory)
        except Exception as e:
            fail(f"AutoTokenizer: {first_line(e)}")
        sample = "Hello world, the quick brown fox."
        if (
            plain_tok(sample, add_special_tokens=False)["input_ids"]
            != tok(sample, add_special_tokens=False)["input_ids"]
        ):
            fail("AutoTokenizer and PreTrainedTokenizerFast (no custom code) encode differently")
        for key in SPECIAL_IDS:
            ids = {
                "tokenizer": getattr(tok, key),
                "config.json": getattr(cfg, key, None),
                "tokenizer without custom code": getattr(plain_tok, key),
            }
            if gen is not None:
                ids["generation_config.json"] = getattr(gen, key, None)
            if len(set(ids.values())) > 1:
                fail(f"{key} differs: " + ", ".join(f"{k} {v}" for k, v in ids.items()))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=trust).eval()
    except Exception as e:
        fail(f"AutoModelForCausalLM: {first_line(e)}")
    if model is not None:
        mine, theirs = model.state_dict(), loaded.state_dict()
        if sorted(mine) != sorted(theirs):
            fail(f"reloaded tensors differ in names: {sorted(set(mine) ^ set(theirs))[:3]}")
        for k, v in mine.items():
            if v.dtype != theirs[k].dtype or not torch.equal(v, theirs[k]):
                fail(f"reloaded {k} differs from the exported tensor ({theirs[k].dtype} vs {v.dtype})")

    pad = next((i for i in (cfg.pad_token_id, cfg.eos_token_id) if i is not None), 0)  # masked out anyway
    limit = max(2, min(16, int(getattr(cfg, "max_position_embeddings", 16)) - new_tokens))
    if tok is not None:
        tok.padding_side = "left"
        texts = ["Hello", "Hello world, the quick brown fox jumps over the lazy dog."]
        prompts = [tok(t)["input_ids"][:limit] for t in texts]
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (2, limit)]
    if min(map(len, prompts)) == 0 or len(prompts[0]) == len(prompts[1]):
        fail(f"the check's prompts tokenize to lengths {[len(p) for p in prompts]}: cannot build a padded batch")
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    loaded.to(torch.float64)  # the structural check in float64 (the tensors were compared above)
    handle, magnitude = _head_term_magnitude(loaded)
    with torch.no_grad():
        try:
            batch_tokens, batch_logits = _greedy(loaded, ids, mask, pad, new_tokens)
            singles = [
                _greedy(loaded, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), pad, new_tokens)
                for p in prompts
            ]
        except Exception as e:
            fail(f"generate on a padded batch: {first_line(e)}")
        finally:
            handle.remove()
        tol = padding_check_bound(cfg, width + new_tokens, magnitude[0])
        for r, (tokens, logits) in enumerate(singles):
            if not torch.isfinite(batch_logits[r]).all():
                fail(f"generate on a padded batch gives non-finite logits (row {r})")
            for t in range(new_tokens):
                diff = float((batch_logits[r, t] - logits[0, t]).abs().max())
                if diff > tol:
                    fail(
                        f"padded batch row {r}, new token {t}: logits differ from the unpadded prompt's by {diff:.3g} "
                        f"in float64 (derived bound {tol:.3g})"
                    )
                a, b = int(batch_tokens[r, t]), int(tokens[0, t])
                if a != b:
                    if float(logits[0, t, b] - logits[0, t, a]) > tol:
                        fail(f"padded batch row {r} generates token {a} at step {t}, its unpadded prompt {b}")
                    break  # a tie: the continuations diverge legitimately


def export_hf_dir(
    out_dir,
    hf_opt_state_dict: Mapping[str, torch.Tensor],
    opt_config_kwargs: Mapping,
    variant,
    *,
    seq_length: Optional[int] = None,
    extra_state: Optional[Mapping[str, torch.Tensor]] = None,
    tokenizer_dir=None,
    dtype=None,
    calibration_batches: Optional[Iterable] = None,
    family: str = "opt",
) -> Path:
    """Write a Hugging Face model directory; see the module docstring. Returns ``Path(out_dir)``.

    family: the model family (megatron_outeff/models/family.py) whose transformers classes (vanilla) or
    remote code (other variants) the directory holds; its config kwargs and state-dict names
    (``opt_config_kwargs`` / ``hf_opt_state_dict`` then hold that family's, e.g. LlamaConfig fields).

    seq_length: the training sequence length (needed only by the clip_alpha form).
    opt_config_kwargs: transformers ``OPTConfig`` fields (vocab_size, hidden_size, num_hidden_layers,
    ffn_dim, num_attention_heads, max_position_embeddings, ...). dtype: None/"fp32", "fp16", "bf16"
    (or the torch dtype). With fp16, weights beyond 65504 are refused, and ``calibration_batches``
    (input_ids tensors) if given are run through the fp16 model (``fp16_overflow_check``): the first
    intermediate that overflows is named and the export refused.
    """
    out_dir = Path(out_dir)
    try:
        fam = get_family(family)
    except ValueError as e:
        _fail(str(e))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        _fail(f"{out_dir} exists and is not an empty directory; refusing to overwrite")
    if dtype not in _DTYPES:
        _fail(f"dtype={dtype!r}: expected fp32, fp16 or bf16")
    torch_dtype = _DTYPES[dtype]
    fields = resolve_variant(variant, seq_length)
    overlap = sorted(set(opt_config_kwargs) & (set(fields) | {"model_type", "auto_map"}))
    if overlap:
        _fail(f"opt_config_kwargs must not contain {overlap}: the variant sets them")

    sd = dict(hf_opt_state_dict)
    for k, t in (extra_state or {}).items():
        if k in sd:
            _fail(f"extra_state key {k!r} is also in hf_opt_state_dict")
        sd[k] = t
    _check_finite(sd)

    plain = is_plain_opt(fields)
    config_class, model_class = fam.hf_classes(plain)
    try:
        config = config_class(**opt_config_kwargs, **({} if plain else fields))
    except (TypeError, ValueError) as e:
        _fail(f"bad config: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is loaded below: skip the random init
        model = model_class(config).eval()
    model.tie_weights()

    tied = bool(getattr(config, "tie_word_embeddings", True))
    if tied and "lm_head.weight" in sd:
        emb_key = next(
            k for k, p in model.state_dict(keep_vars=True).items() if p is model.get_input_embeddings().weight
        )
        emb = sd.get(emb_key)
        if emb is None or not torch.equal(sd["lm_head.weight"], emb):
            _fail(f"lm_head.weight differs from {emb_key} but tie_word_embeddings=True")
        del sd["lm_head.weight"]
    expected = {k: p for k, p in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        _fail(
            f"state-dict keys do not match the {type(model).__name__} of this variant: "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            _fail(f"tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
    if torch_dtype == torch.float16:
        over = fp16_overflow_report(sd)
        if over:
            _fail(f"{len(over)} tensor(s) overflow fp16: " + "; ".join(over[:4]) + ("; ..." if len(over) > 4 else ""))
    with torch.no_grad():
        model.load_state_dict({k: t.detach().to(expected[k].dtype) for k, t in sd.items()}, strict=not tied)
    if tied and model.lm_head.weight is not model.get_input_embeddings().weight:
        _fail("internal: lm_head is not tied to the input embeddings")  # never written untied garbage
    if torch_dtype == torch.float16 and calibration_batches is not None:
        first = fp16_overflow_check(model, calibration_batches)
        if first:
            _fail(f"fp16 refused: {first}")

    tok_files, tok_source = [], None
    if tokenizer_dir is not None:
        try:
            tok_files, tok_source = tokenizer_inputs(tokenizer_dir)
        except ValueError as e:
            _fail(f"tokenizer_dir {tokenizer_dir}: {e}")

    with atomic_output_dir(out_dir) as tmp:
        for f in tok_files:
            shutil.copyfile(f, tmp / f.name)
        if tok_source is not None:
            from megatron_outeff.data.hf_tokenizer import save_hf_tokenizer

            save_hf_tokenizer(tok_source, tmp)
        if tok_files or tok_source is not None:
            _use_tokenizer_special_ids(model, tmp, f"tokenizer_dir {tokenizer_dir}")
        model.to(torch_dtype)
        model.save_pretrained(tmp)
        if not plain:
            for fname, data in exported_sources().items():
                (tmp / fname).write_bytes(data)
            _check_relative_imports_resolve(tmp)
        check_exported_dir(tmp, model, plain=plain, family=family)  # a failure leaves nothing behind
    return out_dir


__all__ = [
    "FP16_MAX",
    "export_hf_dir",
    "exported_sources",
    "tokenizer_inputs",
    "check_exported_dir",
    "fp16_overflow_check",
    "fp16_overflow_report",
    "hf_tokenizer_id_count",
    "is_plain_opt",
    "resolve_variant",
]
