"""Tiny fixtures for the evaluation-tool tests: two random models exported with export_hf_dir (a plain
OPT with a planted outlier channel, and a softmax1 OutEffOPT), a word-level tokenizer and a text corpus.

(A uniquely named module, not conftest.py: several test folders have a conftest.)"""

import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))
from hf_testlib import TINY, random_weights  # noqa: E402
from train_testlib import run_tool, set_args  # noqa: E402

PLANT_CHANNEL = 17
PLANT_SCALE = 50.0
PLANT_KEY = "model.decoder.final_layer_norm.weight"
WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but "
    "have an they you were her she there been one all we their has would when who will more if no out so "
    "said what up its about into than them can only other new some could time these two may then do first"
).split()
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def write_tokenizer(directory):
    """A word-level tokenizer.json (ids < TINY vocab 256), built without training."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    return path


def write_corpus(path, n_docs, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 90)))}) + "\n")
    return str(path)


def export_cmd(model_dir, output_dir, calib_data) -> list:
    """The command line of tools/export_fp16_w8a8.py on ``model_dir`` with a small calibration (2 batches of
    2 blocks of 16 tokens of ``calib_data``), writing ``output_dir``/fp16 and ``output_dir``/w8a8."""
    return [
        sys.executable,
        os.path.join(ROOT, "tools", "export_fp16_w8a8.py"),
        str(model_dir),
        *("--output-dir", str(output_dir), "--calib-data", str(calib_data)),
        *("--block-size", "16", "--num-calib-batches", "2", "--calib-batch-size", "2"),
    ]


def save_random_hf(model, path) -> dict:
    """Every parameter of the Hugging Face ``model`` drawn from 0.2 N(0, 1) (torch's global generator), the
    model saved to ``path`` (save_pretrained): its state dict as written (model.safetensors)."""
    import torch
    from safetensors.torch import load_file

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return load_file(os.path.join(str(path), "model.safetensors"))


def run_experiment(config, output_dir, overrides, tmp_path, timeout=600):
    """tools/run_experiment.py on ``config`` into ``output_dir`` with ``--set`` of each override, as a user
    runs it (train_testlib.run_tool: a fresh interpreter), offline, with its own HF_HOME under ``tmp_path``:
    the CompletedProcess."""
    args = ["--config", config, "--output-dir", output_dir, *set_args(overrides)]
    offline = dict(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return run_tool("run_experiment", *args, timeout=timeout, **offline)


def build_models(root):
    """{"vanilla": dir (plain OPT, planted outlier), "sm1": dir (softmax1)}, plus the tokenizer dir."""
    from megatron_outeff.hf import export_hf_dir, resolve_variant

    tok_dir = os.path.join(root, "tok")
    write_tokenizer(tok_dir)
    out = {}
    for name, variant, seed in (("vanilla", "vanilla", 0), ("sm1", "softmax1", 1)):
        opt, extra = random_weights(resolve_variant(variant), seed=seed)
        if name == "vanilla":
            opt[PLANT_KEY] = opt[PLANT_KEY].clone()
            opt[PLANT_KEY][PLANT_CHANNEL] *= PLANT_SCALE
        out[name] = str(
            export_hf_dir(
                os.path.join(root, name), opt, TINY, variant, extra_state=extra or None, tokenizer_dir=tok_dir
            )
        )
    return out, tok_dir
