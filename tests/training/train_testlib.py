"""Shared settings of the training tests: a tiny deterministic run (fp32, no clipping, no dropout)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
DEMO = str(ROOT / "configs/train/demo-tiny.yaml")

# The oracle settings: every layout must reproduce this loss curve.
BASE = [
    "train.train_iters=4",
    "train.clip_grad=0",
    "train.eval_interval=0",
    "checkpoint.dir=null",
    "logging.tensorboard_dir=null",
    "logging.log_interval=1",
    "precision.dtype=fp32",
    "model.arch_overrides={vocab_size: 256, hidden_dropout: 0.0, attention_dropout: 0.0}",
    "parallel.micro_batch_size=1",
    "parallel.global_batch_size=4",
    "schedule.warmup_iters=1",
    "parallel.zero_stage=0",
]


def env():
    from megatron_outeff.megatron.parallel import single_process_env

    e = single_process_env()  # no launcher variables: each child starts its own group
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions"))
    e["PYTHONUNBUFFERED"] = "1"
    return e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_arch(family: str, **fields):
    """The family's ArchConfig (models/family.py) of a tiny model: name "t", 4 layers, 64 wide, 4 heads,
    vocabulary 200, 32 positions; ``fields`` override or add (ffn_hidden_size, num_query_groups, ...)."""
    from megatron_outeff.models.family import get_family

    shape = dict(
        name="t", num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=200, max_position_embeddings=32
    )
    return get_family(family).arch.ArchConfig(**{**shape, **fields})


def set_args(overrides) -> list:
    """The command-line form of config overrides: ``--set`` before each."""
    return [a for s in overrides for a in ("--set", s)]


def train_cmd(overrides, launcher=(PYTHON,)) -> list:
    """The trainer's command line on the demo config with ``overrides`` (BASE not included), started by
    ``launcher`` (a python, or torchrun and its arguments)."""
    return [*launcher, "-m", "megatron_outeff.training.train", "--config", DEMO, *set_args(overrides)]


def run(cmd, *, timeout, cwd=ROOT, **extra_env) -> subprocess.CompletedProcess:
    """``cmd`` run to its end in ``cwd`` with env() plus ``extra_env``, stdout and stderr captured as text."""
    return subprocess.run(cmd, env=dict(env(), **extra_env), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_tool(name: str, *args, timeout=600, **extra_env) -> subprocess.CompletedProcess:
    """tools/<name>.py with ``args`` (each as str()), as a user runs it, through run()."""
    return run([PYTHON, str(ROOT / "tools" / f"{name}.py"), *map(str, args)], timeout=timeout, **extra_env)


def torchrun_launcher(nproc: int = 2) -> list:
    """``torchrun --nproc_per_node nproc`` on a free master port: the words before a script or ``-m module``."""
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port())]


def run_torchrun(script, *args, nproc: int = 2, timeout, **extra_env) -> subprocess.CompletedProcess:
    """torchrun_launcher(nproc) of the test worker ``script`` with ``args``, through run()."""
    return run([*torchrun_launcher(nproc), str(script), *map(str, args)], timeout=timeout, **extra_env)


def assert_exit_0(r: subprocess.CompletedProcess, tail: int = 3000) -> None:
    """The process exited 0; else the ends of its stdout and stderr are the message."""
    assert r.returncode == 0, r.stdout[-tail:] + r.stderr[-tail:]


def load_tp1(model, path, *, arch, variant, seq_length: int = 32) -> dict:
    """checkpoint_format.load_into_model of ``path`` into a TP=1, PP=1 model (the tests' runs: 32 tokens)."""
    from megatron_outeff.checkpoint_format import load_into_model

    return load_into_model(
        model, path, arch=arch, variant=variant, seq_length=seq_length, tp_rank=0, tp=1, pp_rank=0, pp=1
    )


def megatron_model_tp1(cfg, path):
    """The megatron model of training config ``cfg`` at TP=1, PP=1 with the checkpoint ``path`` loaded,
    in eval mode (the parallel state must be TP=1, PP=1)."""
    from megatron_outeff.training.model import arch_config, attention_variant, build_model

    model = build_model(cfg)
    load_tp1(model, path, arch=arch_config(cfg), variant=attention_variant(cfg))
    return model.eval()


def tensorboard_scalars(tb_dir) -> dict:
    """{tag: [(step, value), ...]} over every run directory MetricsLogger writes (the iteration axis in
    tb_dir, the samples / tokens axes in its vs_samples / vs_tokens), read by TensorBoard's own
    EventAccumulator, which applies restart purges as the TensorBoard UI does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for sub in ("", "vs_samples", "vs_tokens"):
        if not (Path(tb_dir) / sub).is_dir():
            continue  # the callers assert on the tags they expect
        acc = EventAccumulator(str(Path(tb_dir) / sub))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            assert tag not in out, f"{tag} written on two step axes"
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
INDEXED_VOCAB = 304  # the model's vocabulary for indexed_corpus's tokenizer (300 ids)


def indexed_corpus(directory, sizes: dict, *, min_words: int = 3, max_words: int = 30, seed: int = 0) -> dict:
    """Megatron indexed datasets of random-word documents, one per name in ``sizes`` ({name: number of
    documents of min_words..max_words words}), and the sentencepiece tokenizer (300 ids, trained on a
    fixed larger corpus) they were tokenized with: {name: prefix, ..., "tokenizer": path}. Short documents
    put several end-of-document tokens in a sample, so eod_mask_loss gives each sample another mask."""
    import json
    import random

    from megatron_outeff.data.preprocess import preprocess_corpus
    from megatron_outeff.data.tokenizer_training import train_sentencepiece

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def write(path, n, lo, hi, rng):
        path.write_text(
            "".join(
                json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))}) + "\n"
                for _ in range(n)
            )
        )
        return str(path)

    text = write(directory / "tokenizer_corpus.jsonl", 120, 60, 60, random.Random(0))
    out = {"tokenizer": train_sentencepiece([text], str(directory / "spm"), vocab_size=300, num_threads=1)}
    rng = random.Random(seed)
    for name, n in sizes.items():
        corpus = write(directory / f"{name}.jsonl", n, min_words, max_words, rng)
        out[name] = str(directory / "idx" / name)
        preprocess_corpus(corpus, out[name], out["tokenizer"], progress=False)
    return out


def sentencepiece_corpus(corpus, spm_prefix) -> str:
    """120 documents of 60 random WORDS (seed 0) written to ``corpus`` (JSONL) and the sentencepiece tokenizer
    (300 ids, one thread) trained on them at ``spm_prefix``: the tokenizer's path."""
    import json
    import random

    from megatron_outeff.data.tokenizer_training import train_sentencepiece

    rng = random.Random(0)
    Path(corpus).write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n" for _ in range(120))
    )
    return train_sentencepiece([str(corpus)], str(spm_prefix), vocab_size=300, num_threads=1)


def indexed_sets(corpus: dict, train_paths: str, *extra: str) -> list:
    """Config overrides for data.source=indexed on indexed_corpus's data (train_paths: a YAML list)."""
    return [
        f"model.arch_overrides.vocab_size={INDEXED_VOCAB}",
        "data.source=indexed",
        f"data.train_paths={train_paths}",
        f"data.tokenizer={corpus['tokenizer']}",
        *extra,
    ]


def poison_hook(iteration: int, micro_per_step: int, kind: str = "grad", ranks=None):
    """A ``train()`` model_hook that makes step ``iteration`` (1-based) non-finite on the given global
    ranks (all if None): ``kind="grad"`` puts a NaN into one gradient element of decoder layer 0's fc1
    weight on the first micro-batch (the loss stays finite), ``"loss"`` adds NaN to the model's
    per-token losses. The models it saw are in ``hook.models``."""

    def hook(model):
        import torch.distributed as dist

        from megatron_outeff.training.model import unwrap

        hook.models.append(model)
        if ranks is not None and dist.get_rank() not in ranks:
            return
        calls = [0]

        def step():  # the step of the micro-batch being computed
            return (calls[0] - 1) // micro_per_step + 1

        def count(module, args):
            calls[0] += 1

        model.register_forward_pre_hook(count)
        if kind == "grad":

            def poison_grad(grad):
                if step() != iteration or (calls[0] - 1) % micro_per_step:
                    return grad
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
                return grad

            unwrap(model).decoder.layers[0].mlp.linear_fc1.weight.register_hook(poison_grad)
        else:

            def poison_loss(module, args, output):
                return output + float("nan") if step() == iteration else output

            model.register_forward_hook(poison_loss)

    hook.models = []
    return hook


def read_model_file(ckpt, tag, name="tp00_pp00.safetensors"):
    """{name: tensor} of a checkpoint's model file."""
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt) / tag / "model" / name))


def finish_worker(out, results: dict) -> None:
    """End of a torchrun test worker: global rank 0 writes ``results`` as JSON to ``out``; the process
    group goes."""
    import json

    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()
