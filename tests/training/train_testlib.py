"""Shared settings of the training tests: a tiny deterministic run (fp32, no clipping, no dropout)."""

import os
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
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions"))
    e["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
