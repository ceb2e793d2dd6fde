"""Typed config: YAML -> dataclasses, overrides, bad input, the generated DeepSpeed JSON."""

import json
import shutil

import pytest
from train_testlib import DEMO, ROOT, set_args, tiny_arch

from megatron_outeff.errors import OutEffError
from megatron_outeff.training.config import config_from_dict, deepspeed_config, load_config

PAPER = ROOT / "configs/train/opt-125m-paper.yaml"


def test_paper_recipe():
    cfg = load_config(PAPER)
    assert cfg.optimizer.lr == 4e-4 and tuple(cfg.optimizer.betas) == (0.9, 0.95)
    assert cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.decay_norm_weights
    assert cfg.schedule.decay_style == "linear" and cfg.schedule.warmup_iters == 2000
    assert cfg.train.train_iters == 125_000 and cfg.train.clip_grad == 1.0 and cfg.train.seed == 1000
    assert cfg.parallel.global_batch_size == 192 and cfg.data.seq_length == 512
    assert cfg.precision.dtype == "fp16"
    assert cfg.model.arch_overrides["hidden_dropout"] == 0.1 and cfg.model.arch_overrides["init_method_std"] == 0.006
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1.0 and ds["fp16"]["enabled"]
    assert "optimizer" not in ds and "scheduler" not in ds


def test_overrides_and_derived():
    cfg = load_config(
        DEMO, ["parallel.zero_stage=3", "optimizer.betas=[0.8, 0.9]", "train.clip_grad=0", "optimizer.lr=3e-4"]
    )
    assert cfg.optimizer.lr == 3e-4
    assert cfg.parallel.zero_stage == 3 and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.grad_accumulation_steps(world_size=2) == 2  # 8 / (2 x 2)
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.zero_stge=1"], "unknown config key 'parallel.zero_stge'"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["parallel.global_batch_size=7"], "not divisible"),
        (["parallel.pipeline_parallel=2", "parallel.zero_stage=2"], "ZeRO-2/3"),
        (["parallel.pipeline_parallel=2", "parallel.zero_stage=3"], "ZeRO-2/3"),
        (["precision.dtype=fp8"], "precision.dtype"),
        (["parallel.zero_stage=x"], "expected an integer"),
        (["parallel.sequence_parallel=true"], "sequence_parallel needs tensor_parallel"),
        (["precision.dtype=bf16", "parallel.zero_stage=0", "parallel.tensor_parallel=2"], "use zero_stage >= 1"),
        # the nested mappings are checked at load too, by their owners
        (["attention.sofmax=softmax1"], "attention: attention variant key 'sofmax'"),
        (["attention.softmax=softmax2"], "softmax='softmax2'"),
        (["attention={softmax: softmax1, clip_gamma: 0.5}"], "clip_gamma=0.5"),
        (
            ["model.transformer_overrides={hiden_dropout: 0.0}"],
            "unknown config key 'model.transformer_overrides.hiden_dropout'",
        ),
        (["model.arch_overrides={hiden_size: 8}"], "unknown config key 'model.arch_overrides.hiden_size'"),
        # typed: model.arch_overrides against OPTArchConfig, model.transformer_overrides against TransformerConfig,
        # and each knob in one place
        (["model.arch_overrides={hidden_size: x}"], "model.arch_overrides.hidden_size='x': expected an integer"),
        (["model.arch_overrides={hidden_size: 63}"], "model.arch_overrides: opt-tiny: hidden_size=63 is not divisible"),
        (
            ["model.transformer_overrides={apply_query_key_layer_scaling: 3}"],
            "model.transformer_overrides.apply_query_key_layer_scaling=3: expected true or false",
        ),
        (["model.transformer_overrides={attention_backend: 3}"], "attention_backend=3: expected one of flash, fused"),
        (["model.transformer_overrides={init_method: 3}"], "init_method=3: megatron expects a Python object"),
        (
            ["model.transformer_overrides={hidden_dropout: 0.0}"],
            "model.transformer_overrides.hidden_dropout: set by the architecture: use model.arch_overrides.hidden_dropout",
        ),
        (["model.transformer_overrides={normalization: RMSNorm}"], "normalization: fixed by the OPT architecture"),
        (["model.transformer_overrides={fp16: true}"], "model.transformer_overrides.fp16: set by precision.dtype"),
        (["model.transformer_overrides={recompute_method: block}"], "set by model.recompute_method"),
        (["model.transformer_overrides={softmax_type: learnable}"], "softmax_type: set by attention"),
        # knobs that make a model the checkpoint format / converter / export cannot handle: the supported way named
        (
            ["model.transformer_overrides={attention_output_gate: true}"],
            "model.transformer_overrides.attention_output_gate: adds the elementwise output gate's rows to linear_qkv",
        ),
        (["model.transformer_overrides={attention_output_gate: true}"], "use attention.gate: elementwise"),
        (["model.transformer_overrides={num_query_groups: 2}"], "num_query_groups: grouped-query attention"),
        (["model.transformer_overrides={num_query_groups: 2}"], "not supported for the OPT family"),
        (["model.transformer_overrides={num_layers_in_first_pipeline_stage: 1}"], "use parallel.pipeline_parallel"),
        (["model.transformer_overrides={virtual_pipeline_model_parallel_size: 2}"], "no virtual stages"),
        (["model.transformer_overrides={num_moe_experts: 4}"], "silently ignore"),
        (["model.transformer_overrides={qk_layernorm: true}"], "silently ignore"),
        (["model.arch=tinny"], "model.arch='tinny'"),
        (["model.recompute_method=blok"], "model.recompute_method='blok'"),
        (["parallel.tensor_parallel=3", "parallel.zero_stage=1"], "not divisible by tensor parallel size 3"),
        (["model.vocab_size=100"], "model.vocab_size=100"),
        (["logging.log_interval=0"], "logging.log_interval=0"),
        (["deepspeed_overrides=/nonexistent/ds.json"], "deepspeed_overrides file not found"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(OutEffError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(DEMO, overrides)


def test_attention_is_a_typed_section():
    """`attention` loads as the typed variant (its owner parses it); an empty section is vanilla softmax, and
    spelling out a default changes neither the variant nor the run's fingerprint."""
    from megatron_outeff.ops.variants import AttentionVariantConfig

    cfg = load_config(DEMO, ["attention={softmax: softmax_n, softmax_n: 2}"])
    assert cfg.attention == AttentionVariantConfig(softmax="softmax_n", softmax_n=2.0)
    empty, explicit = load_config(DEMO, ["attention={}"]), load_config(DEMO, ["attention={softmax: vanilla}"])
    assert empty.attention == explicit.attention == AttentionVariantConfig()
    assert empty.fingerprint() == explicit.fingerprint() != cfg.fingerprint()


def test_typed_overrides_reach_megatron():
    """Overrides in their types: an Enum field by its member name, a float given as YAML's "1e-3" string."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_outeff.training.model import arch_config, transformer_overrides

    cfg = load_config(
        DEMO, ["model.transformer_overrides={attention_backend: local}", "model.arch_overrides.init_method_std=1e-3"]
    )
    assert transformer_overrides(cfg)["attention_backend"] is AttnBackend.local
    assert arch_config(cfg).init_method_std == 1e-3
    assert cfg.model.transformer_overrides == {
        "attention_backend": "local"
    }  # the config (and its fingerprint) as written


def test_batch_not_divisible_by_dp():
    cfg = load_config(DEMO, ["parallel.global_batch_size=6"])  # micro 2: fine for DP 1
    assert cfg.grad_accumulation_steps(1) == 3
    with pytest.raises(OutEffError, match="not divisible by micro_batch_size x data_parallel"):
        cfg.grad_accumulation_steps(2)
    with pytest.raises(OutEffError, match="world size 3 is not divisible"):
        load_config(DEMO, ["parallel.tensor_parallel=2"]).grad_accumulation_steps(3)


def test_deepspeed_overrides(tmp_path):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}))
    ds = deepspeed_config(load_config(DEMO, [f"deepspeed_overrides={ok}"]), 1)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(OutEffError, match="zero_optimization.stage"):
        deepspeed_config(load_config(DEMO, [f"deepspeed_overrides={bad}"]), 1)
    for name in ("zero1", "zero2", "zero3", "zero2-cpu-offload"):  # shipped examples parse and merge
        stage = int(name[4])
        deepspeed_config(
            load_config(
                DEMO, [f"deepspeed_overrides={ROOT}/configs/deepspeed/{name}.json", f"parallel.zero_stage={stage}"]
            ),
            1,
        )


def test_fingerprint_ignores_logging_and_checkpoint_places():
    a = config_from_dict({"train": {"train_iters": 5}})
    b = config_from_dict(
        {
            "train": {"train_iters": 5, "exit_interval": 2},
            "checkpoint": {"dir": "x"},
            "logging": {"tensorboard_dir": "y"},
        }
    )
    c = config_from_dict({"train": {"train_iters": 6}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize(
    "interval, named",
    [
        ("train.eval_interval=5", "train.eval_interval=5"),
        ("logging.outlier_interval=10", "logging.outlier_interval=10"),
    ],
)
def test_empty_validation_split_with_an_interval_is_refused_at_load(interval, named, tmp_path):
    """Issue 19 item 5: validation / the outlier probe on with a validation split that has no share would
    train without them, silently. Refused when the config loads (so before anything is written), naming
    the interval and the split; the trainer's CLI gives that one line and exit code 2."""
    from megatron_outeff.training.train import main

    indexed = [
        "data.source=indexed",
        f"data.train_paths=[{tmp_path / 'corpus'}]",
        f"data.tokenizer={tmp_path / 'tok.model'}",
        "train.eval_interval=0",
        "logging.outlier_interval=0",
    ]
    for split in ("100,0,0", "99,0,1", "1,0"):
        with pytest.raises(OutEffError, match=rf"{named}.*data\.split='{split}' gives the validation split no share"):
            load_config(DEMO, indexed + [interval, f"data.split={split}"])
    load_config(DEMO, indexed + [interval, "data.split=99,1,0"])  # a validation share
    load_config(DEMO, indexed + [interval, "data.split=100,0,0", f"data.valid_paths=[{tmp_path / 'valid'}]"])
    load_config(DEMO, indexed + ["data.split=100,0,0"])  # no interval: no validation wanted
    ck, tb = tmp_path / "ck", tmp_path / "tb"
    logs = [f"checkpoint.dir={ck}", f"logging.tensorboard_dir={tb}"]
    argv = ["--config", DEMO, *set_args(indexed + [interval, "data.split=100,0,0", *logs])]
    assert main(argv) == 2
    assert not ck.exists() and not tb.exists()


@pytest.mark.parametrize("split", ["969;30;1", "a,b", "1,2,3,4", "0,0,0", "-1,2,0"])
def test_a_malformed_split_is_refused_at_load(split, tmp_path):
    with pytest.raises(OutEffError, match=rf"data\.split='{split}'"):
        load_config(DEMO, ["data.source=indexed", f"data.train_paths=[{tmp_path / 'corpus'}]", f"data.split={split}"])


def test_fingerprint_identifies_files_by_what_they_are(tmp_path, monkeypatch):
    """Places (the index cache) are not part of the run, and a data path, the tokenizer, an arch YAML or
    the DeepSpeed overrides count by what they are, not how they are written: another spelling, a
    symlink, a copy of the same bytes elsewhere is the same run; other data or other bytes are not.
    Before, a moved cache_dir or `./data/x` for `data/x` was refused as another run."""
    import os

    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "alias").symlink_to(data)
    tok = tmp_path / "tok" / "spm.model"
    tok.parent.mkdir()
    tok.write_bytes(b"tokenizer bytes")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tok, tmp_path / "elsewhere" / "copy.model")
    arch = tmp_path / "arch.yaml"
    shutil.copy(ROOT / "configs/model/opt-tiny.yaml", arch)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    monkeypatch.chdir(tmp_path)

    def fp(train_paths, tokenizer=str(tok), cache=None, arch_path=str(arch), ds_path=str(ds)):
        return config_from_dict(
            {
                "model": {"arch": arch_path},
                "deepspeed_overrides": ds_path,
                "data": {"source": "indexed", "train_paths": train_paths, "tokenizer": tokenizer, "cache_dir": cache},
            }
        ).fingerprint()

    base = fp([str(data / "corpus")])
    same = [
        fp([str(data / "corpus")], cache=str(tmp_path / "moved-cache")),  # a place
        fp(["data/corpus"]),
        fp(["./data/../data/corpus"]),
        fp([str(tmp_path / "alias" / "corpus")]),  # spellings
        fp([str(data / "corpus")], tokenizer=str(tok.parent)),  # the directory holding the tokenizer
        fp([str(data / "corpus")], tokenizer=str(tmp_path / "elsewhere" / "copy.model")),  # the same bytes elsewhere
        fp([str(data / "corpus")], arch_path="./arch.yaml"),
        fp([str(data / "corpus")], ds_path="ds.json"),
    ]
    assert same == [base] * len(same)
    (tmp_path / "other.model").write_bytes(b"other tokenizer")
    other_arch = tmp_path / "other.yaml"
    other_arch.write_text(arch.read_text().replace("num_layers: 2", "num_layers: 3"))
    assert other_arch.read_text() != arch.read_text()
    different = [
        fp([str(data / "other")]),
        fp(["0.5", str(data / "corpus"), "0.5", str(data / "other")]),
        fp([str(data / "corpus")], tokenizer=str(tmp_path / "other.model")),
        fp([str(data / "corpus")], arch_path=str(other_arch)),
    ]
    assert len({base, *different}) == 1 + len(different)
    # blend weights stay numbers, paths resolve: two spellings of one weighted blend agree
    assert fp(["0.3", "data/corpus", "0.7", "data/other"]) == fp(
        ["0.3", str(data / "corpus"), "0.7", os.path.join(".", "data", "other")]
    )


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_every_override_that_makes_an_unconvertible_model_is_refused(family):
    """Each TransformerConfig field a YAML value can set (bool flipped, int 1 / 2, float 0.3, every Literal
    choice), applied to a tiny model of each family: any that changes its parameter set (names or shapes, which
    the checkpoint format, converter and export follow) or, with the same weights, its logits (which the
    exported model would then not reproduce) must be refused by model.transformer_overrides, in one line.
    megatron-core decides which do, so a new knob of a later version fails this test until it is handled."""
    import contextlib
    import dataclasses
    import io
    import typing

    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_outeff.megatron.parallel import init_model_parallel
    from megatron_outeff.models.family import get_family
    from megatron_outeff.training.config import check_transformer_overrides

    init_model_parallel(1, 1, 1)
    fam = get_family(family)
    extra = {"num_query_groups": 2} if family == "llama" else {}  # grouped-query attention
    small = dict(num_layers=1, hidden_size=16, ffn_hidden_size=32, vocab_size=32, max_position_embeddings=8)
    arch = tiny_arch(family, **small, hidden_dropout=0.0, attention_dropout=0.0, **extra)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))

    def build(**override):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.manual_seed(0)
            return fam.arch.build_model(arch, None, **override).eval()  # megatron's own layers: every knob they read

    def logits(model):
        with torch.no_grad():
            return model(ids, torch.arange(8).expand_as(ids), None)

    base_model = build()
    # weights large enough that the attention pattern matters (the init's std 0.006 makes it nearly uniform)
    weights = {k: v * 40 if v.dim() == 2 else v for k, v in base_model.state_dict().items() if torch.is_tensor(v)}
    base_model.load_state_dict(weights, strict=False)
    base_shapes, base_logits = {k: tuple(v.shape) for k, v in weights.items()}, logits(base_model)
    hints = typing.get_type_hints(TransformerConfig)
    changing = []
    for f in dataclasses.fields(TransformerConfig):
        types = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        values = []
        for t in types:
            if t is bool:
                values.append(not f.default)
            elif t is int:
                values += [1, 2]
            elif t is float:
                values.append(0.3)
            elif typing.get_origin(t) is typing.Literal:
                values += list(typing.get_args(t))
        for value in values:
            if value == f.default:
                continue
            try:
                model = build(**{f.name: value})
                shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if torch.is_tensor(v)}
                changed = shapes != base_shapes
                if not changed:
                    model.load_state_dict(weights, strict=False)
                    changed = not torch.allclose(logits(model), base_logits, rtol=1e-4, atol=1e-4)
            except Exception:  # megatron (or our layer) refuses the value itself: it builds or runs no model
                continue
            if changed:
                changing.append((f.name, value))
    # the scan sees the knobs that change linear_qkv (grouped-query attention, megatron's own output gate) and
    # the one that changes the function (the attention's scale)
    assert {
        ("num_query_groups", 1 if family == "llama" else 2),
        ("attention_output_gate", True),
        ("softmax_scale", 0.3),
    } <= set(changing)
    if family == "llama":  # and what only Llama's layers read: the rotary embedding and SwiGLU
        assert {("rotary_interleaved", True), ("no_rope_freq", 1), ("glu_linear_offset", 0.3)} <= set(changing)
    for name, value in changing:
        with pytest.raises(OutEffError) as e:
            check_transformer_overrides({name: value}, fam)
        assert "\n" not in str(e.value)
