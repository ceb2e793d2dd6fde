"""Bigram-Backcopy: a synthetic language in which attention sinks emerge within ~1k steps.

After Guo et al., "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token
Phenomena in LLMs" (arXiv 2410.13835). Token ids:

    0                       BOS, first token of every sequence (and only there)
    1 .. num_triggers       trigger tokens
    num_triggers+1 .. V-1   regular tokens

A sequence is BOS, then a first regular token drawn uniformly, then: after a regular token the next
token follows a fixed random bigram Markov chain (over regular and trigger tokens); after a trigger,
the next token COPIES the token just before the trigger. Triggers are only ever emitted by the
bigram chain from a regular token, so the copied token is always regular and triggers never follow
one another. A head that serves the copy has nothing to do at every non-trigger position: that is
where a sink ("no-op" attention on BOS) forms.

The bigram matrix depends only on ``seed`` (the task); sample ``i`` of a stream depends only on
(``stream_seed``, i), so any process can produce any sample (every parallel layout sees the same
global batches, and a resumed run continues mid-stream exactly). The held-out set is the stream of
a fixed ``heldout_seed`` over the same bigram matrix.

Knows nothing of Megatron or DeepSpeed (torch only).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from megatron_outeff.errors import OutEffError

__all__ = ["BOS", "BigramBackcopyTask"]

BOS = 0


@dataclass(frozen=True)
class BigramBackcopyTask:
    """The task: vocabulary size V (BOS + triggers + regular tokens), number of triggers, sequence
    length (tokens per training sample; a generated sequence has seq_length + 1 tokens), task seed,
    and the bigram rows' logit scale (larger = more peaked, lower-entropy bigram positions).

    Raises ValueError (one line naming the value) on impossible parameters: seq_length < 3,
    num_triggers < 1, or fewer than 2 regular tokens (V < num_triggers + 3)."""

    vocab_size: int = 64
    num_triggers: int = 3
    seq_length: int = 128
    seed: int = 0
    logit_scale: float = 2.0

    def __post_init__(self):
        if not isinstance(self.seq_length, int) or self.seq_length < 3:
            raise OutEffError(f"seq_length={self.seq_length!r}: bigram_backcopy needs a sequence length >= 3")
        if not isinstance(self.num_triggers, int) or self.num_triggers < 1:
            raise OutEffError(f"num_triggers={self.num_triggers!r}: expected an integer >= 1")
        if not isinstance(self.vocab_size, int) or self.vocab_size < self.num_triggers + 3:
            raise OutEffError(
                f"vocab_size={self.vocab_size!r} with num_triggers={self.num_triggers}: the vocabulary needs BOS, "
                f"the triggers and at least 2 regular tokens (vocab_size >= num_triggers + 3)"
            )
        if not self.logit_scale > 0:
            raise OutEffError(f"logit_scale={self.logit_scale!r}: expected > 0")
        g = torch.Generator().manual_seed(int(self.seed))
        n_reg = self.vocab_size - 1 - self.num_triggers
        # Rows: one per regular token; columns: next token among triggers + regular tokens (ids 1..V-1).
        logits = self.logit_scale * torch.randn(n_reg, self.vocab_size - 1, generator=g, dtype=torch.float64)
        probs = torch.softmax(logits, dim=-1)
        object.__setattr__(self, "_transitions", probs)
        object.__setattr__(self, "_cdf", probs.cumsum(dim=-1).tolist())

    # ---- token classes ---------------------------------------------------------------------------
    @property
    def first_regular(self) -> int:
        return self.num_triggers + 1

    def is_trigger(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool mask of trigger tokens, same shape as tokens."""
        return (tokens >= 1) & (tokens <= self.num_triggers)

    def copy_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """For model inputs tokens [..., s]: True where the next-token target is a copy (the input
        token is a trigger). The other positions are bigram positions."""
        return self.is_trigger(tokens)

    def idle_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Query positions where a copy head has nothing to do: not a trigger and not the first
        position (BOS attends only to itself)."""
        idle = ~self.is_trigger(tokens)
        idle[..., 0] = False
        return idle

    @property
    def transitions(self) -> torch.Tensor:
        """[n_regular, V-1] float64: row r is P(next = 1 + j | current = first_regular + r)."""
        return self._transitions

    # ---- generation ------------------------------------------------------------------------------
    def sequence(self, stream_seed: int, index: int) -> torch.Tensor:
        """Sample ``index`` of the stream ``stream_seed``: [seq_length + 1] int64, BOS first."""
        g = torch.Generator().manual_seed(int(stream_seed) * 1_000_003 + int(index))
        n = self.seq_length + 1
        n_reg = self.vocab_size - 1 - self.num_triggers
        first = self.first_regular + int(torch.randint(n_reg, (1,), generator=g))
        u = torch.rand(n, generator=g, dtype=torch.float64).tolist()  # one uniform per position
        cdf = self._cdf
        seq = [BOS, first]
        for t in range(2, n):
            prev = seq[t - 1]
            if prev <= self.num_triggers:  # trigger: copy the token before it (always regular)
                seq.append(seq[t - 2])
            else:  # inverse-CDF draw from the bigram row of the regular token prev
                row = cdf[prev - self.first_regular]
                seq.append(1 + min(bisect.bisect_right(row, u[t]), len(row) - 1))
        return torch.tensor(seq, dtype=torch.int64)

    def blocks(self, stream_seed: int, n: int, start: int = 0) -> torch.Tensor:
        """[n, seq_length] model inputs of samples start..start+n-1 of a stream (evaluation blocks:
        each sequence without its last token, so positions stay within the training length)."""
        return torch.stack([self.sequence(stream_seed, start + i)[:-1] for i in range(n)])
