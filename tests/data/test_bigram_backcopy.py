"""Bigram-Backcopy generator: determinism, mid-stream resumption, the copy rule, the bigram chain,
and refusal of impossible parameters."""

import pytest
import torch

from megatron_outeff.data.bigram_backcopy import BOS, BigramBackcopyTask
from megatron_outeff.training.data import BatchSource, make_sample


def test_deterministic_across_instances_and_streams():
    a, b = BigramBackcopyTask(seed=3), BigramBackcopyTask(seed=3)
    for i in (0, 1, 57):
        assert torch.equal(a.sequence(11, i), b.sequence(11, i))
    assert not torch.equal(a.sequence(11, 0), a.sequence(12, 0))  # another stream
    assert not torch.equal(a.transitions, BigramBackcopyTask(seed=4).transitions)  # another task


def test_hand_checked_copy_rule():
    # V = 6: BOS 0, triggers 1 and 2, regular 3, 4, 5. Hand-read one sequence: at every trigger the
    # next token repeats the token before the trigger.
    task = BigramBackcopyTask(vocab_size=6, num_triggers=2, seq_length=30, seed=0)
    seq = task.sequence(5, 0).tolist()
    assert seq[0] == BOS and seq[1] >= 3 and BOS not in seq[1:]
    triggers = [t for t, x in enumerate(seq) if x in (1, 2)]
    assert triggers, seq  # this seed has triggers (checked by eye: several)
    for t in triggers:
        if t + 1 < len(seq):
            assert seq[t + 1] == seq[t - 1], (t, seq)
    # the masks over model inputs agree with the rule
    tokens = torch.tensor(seq[:-1])
    copy = task.copy_positions(tokens)
    assert copy.tolist() == [x in (1, 2) for x in seq[:-1]]
    idle = task.idle_positions(tokens)
    assert not idle[0] and torch.equal(idle[1:], ~copy[1:])


def test_copy_rule_and_token_classes_on_many_sequences():
    task = BigramBackcopyTask(vocab_size=16, num_triggers=3, seq_length=64, seed=1)
    for i in range(200):
        s = task.sequence(9, i)
        assert s.shape == (65,) and s[0] == BOS and (s[1:] > 0).all() and (s < 16).all()
        trig = task.is_trigger(s)
        assert not trig[1]
        idx = trig.nonzero().flatten()
        idx = idx[idx + 1 < s.numel()]
        assert torch.equal(s[idx + 1], s[idx - 1])  # copy target = token before the trigger
        assert not task.is_trigger(s[idx - 1]).any()  # triggers never follow one another


def test_bigram_positions_follow_the_transition_matrix():
    task = BigramBackcopyTask(vocab_size=8, num_triggers=1, seq_length=256, seed=2)
    counts = torch.zeros(task.transitions.shape, dtype=torch.float64)
    for i in range(60):
        s = task.sequence(1, i)
        for t in range(2, s.numel()):
            prev = int(s[t - 1])
            if prev > task.num_triggers:  # a bigram position
                counts[prev - task.first_regular, int(s[t]) - 1] += 1
    n = counts.sum(dim=1, keepdim=True)
    p = task.transitions
    # each cell within 5 binomial standard deviations (+ 1 count) of its expectation
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sd + 1).all()


def test_resumable_mid_stream():
    task = BigramBackcopyTask(vocab_size=32, num_triggers=2, seq_length=16, seed=0)
    sample = lambda i: make_sample(task.sequence(7, i))  # noqa: E731
    kw = dict(micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1)
    straight = BatchSource(sample, **kw)
    batches = [straight.next_global_batch() for _ in range(5)]
    resumed = BatchSource(sample, **kw)
    stopped = BatchSource(sample, **kw)
    for _ in range(3):
        stopped.next_global_batch()
    resumed.load_state_dict(stopped.state_dict())
    for k in (3, 4):
        got = resumed.next_global_batch()
        for m in range(2):
            for key in got[m]:
                assert torch.equal(got[m][key], batches[k][m][key])


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(seq_length=2), "seq_length=2"),
        (dict(vocab_size=5, num_triggers=3), "vocab_size=5"),
        (dict(vocab_size=64, num_triggers=80), "vocab_size=64"),
        (dict(num_triggers=0), "num_triggers=0"),
    ],
)
def test_impossible_parameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        BigramBackcopyTask(**kwargs)


def test_training_config_source():
    from megatron_outeff.errors import OutEffError
    from megatron_outeff.training.config import config_from_dict

    cfg = config_from_dict(
        {
            "data": {
                "source": "bigram_backcopy",
                "seq_length": 16,
                "bigram_backcopy": {"vocab_size": 20, "num_triggers": 2},
            }
        }
    )
    assert cfg.data.bigram_backcopy.num_triggers == 2
    with pytest.raises(OutEffError, match="num_triggers=30"):
        config_from_dict(
            {"data": {"source": "bigram_backcopy", "bigram_backcopy": {"vocab_size": 20, "num_triggers": 30}}}
        )
    with pytest.raises(OutEffError, match="seq_length=2"):
        config_from_dict({"data": {"source": "bigram_backcopy", "seq_length": 2}})
    with pytest.raises(OutEffError, match="'nonsense'"):
        config_from_dict({"data": {"source": "nonsense"}})
