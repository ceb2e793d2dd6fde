"""perplexity(): exact token-weighted mean NLL, from blocks or from text with a tokenizer."""

import math

import pytest
import torch
from hf_testlib import TINY, random_weights
from tolerance import rounding_bound

from megatron_outeff.hf import OutEffOPTConfig, OutEffOPTForCausalLM, export_hf_dir, perplexity, resolve_variant


@pytest.fixture(scope="module")
def model():
    fields = resolve_variant({"softmax": "softmax1", "gate": "linear"})
    opt_sd, extra = random_weights(fields, seed=7)
    m = OutEffOPTForCausalLM(OutEffOPTConfig(**TINY, **fields)).eval()
    m.load_state_dict({**opt_sd, **extra}, strict=False)
    # float64: batched and one-by-one forwards differ by rounding only, far below REL on any machine
    return m.double()


# perplexity() takes the cross-entropy in float32 of the (float64) logits, _by_hand in float64: the
# difference is float32 rounding of a log-sum-exp over the vocabulary, relative to a loss of the
# terms' size (tests/tolerance.py)
REL = rounding_bound(torch.float32, 1.0, TINY["vocab_size"])


def _by_hand(model, blocks):
    nll, n = 0.0, 0
    for b in blocks:
        ids = torch.tensor(b).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        nll += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        n += len(b) - 1
    return nll / n, n


def test_blocks_match_cross_entropy_by_hand(model):
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(3, 256, (9,), generator=g).tolist() for _ in range(3)] + [
        torch.randint(3, 256, (4,), generator=g).tolist()
    ]
    loss, n = _by_hand(model, blocks)
    r = perplexity(model, blocks, batch_size=2)
    assert r["tokens"] == n == 3 * 8 + 3
    assert r["loss"] == pytest.approx(loss, rel=REL)
    assert r["ppl"] == pytest.approx(math.exp(loss), rel=REL)
    # a plain callable tokens -> logits, and a [n, s] tensor of blocks
    t = torch.tensor(blocks[:3])
    r2 = perplexity(lambda ids: model(input_ids=ids).logits, t)
    assert r2["loss"] == pytest.approx(_by_hand(model, blocks[:3])[0], rel=REL) and r2["tokens"] == 24


def test_text_with_tokenizer_from_export(tmp_path, model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = "the a of and to in is was he for it with as his on be at by".split()
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    fast.save_pretrained(tmp_path / "tok")
    sd = {k: v.float() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    extra = {k: sd.pop(k) for k in list(sd) if ".gate." in k}
    out = export_hf_dir(
        tmp_path / "m",
        sd,
        TINY,
        {"softmax": "softmax1", "gate": "linear"},
        extra_state=extra,
        tokenizer_dir=tmp_path / "tok",
    )
    assert (out / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = ["the a of and to in is was he", "for it with as his on be at by the a"]
    ids = sum((tokenizer(t, add_special_tokens=False)["input_ids"] for t in text), [])
    assert len(ids) == 20
    r = perplexity(model, text=text, tokenizer=tokenizer, block_size=8)
    blocks = [ids[0:8], ids[8:16], ids[16:20]]
    loss, n = _by_hand(model, blocks)
    assert r["tokens"] == n == 7 + 7 + 3
    assert r["loss"] == pytest.approx(loss, rel=REL)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="exactly one"):
        perplexity(model)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [[5]])
