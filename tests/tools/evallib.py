"""Tiny fixtures for the evaluation-tool tests: two random models exported with export_hf_dir (a plain
OPT with a planted outlier channel, and a softmax1 OutEffOPT), a word-level tokenizer and a text corpus.

(A uniquely named module, not conftest.py: several test folders have a conftest.)"""

import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf"))
from hf_testlib import TINY, random_weights  # noqa: E402

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
