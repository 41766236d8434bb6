"""What an evaluation computes from logits: perplexity, and the distance of a model's next-token
distributions from the reference's. numpy only, so that every figure can be checked by hand.

Windows are laid out as llama.cpp's ``llama-perplexity`` lays them: the text's tokens cut
into consecutive windows of ``context`` tokens, each read on its own, and only the second
half of each scored (the first half gives every scored token a context of at least half
a window), so that figures compare with those its users publish.

The reference's distributions are kept as their ``TOP_K`` most likely tokens and what is
left: KL(reference ‖ engine) sums over those tokens and one bucket for the rest. A 0.5B
model's top 64 tokens hold nearly all of its probability; what the bucket misses is the
divergence spread thin over the tail, and the figure is a lower bound of the exact one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOP_K = 64


@dataclass(frozen=True)
class Windows:
    ids: np.ndarray  # (windows, context) token ids

    @property
    def context(self) -> int:
        return int(self.ids.shape[1])

    @property
    def first_scored(self) -> int:
        """The first logits row scored in a window: it predicts the token after it."""
        return self.context // 2

    @property
    def scored_per_window(self) -> int:
        return self.context - 1 - self.first_scored

    def targets(self, window: int) -> np.ndarray:
        """The tokens the scored rows of ``window`` predict."""
        return self.ids[window, self.first_scored + 1 :]


def make_windows(ids: list[int], context: int, max_scored: int) -> Windows:
    """As many whole windows as ``max_scored`` scored tokens need and ``ids`` hold (at least one)."""
    if context < 4:
        raise ValueError("a window needs at least 4 tokens")
    per_window = context - 1 - context // 2
    wanted = max(1, math.ceil(max_scored / per_window))
    available = len(ids) // context
    if available < 1:
        raise ValueError(f"the text is {len(ids)} tokens, less than one window of {context}")
    count = min(wanted, available)
    return Windows(np.asarray(ids[: count * context], dtype=np.int64).reshape(count, context))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64 (the tail's small probabilities matter to KL)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


ROWS_AT_ONCE = 32  # float64 log-probabilities of a 152k vocabulary: 39 MB for 32 rows


def _scored_log_probs(windows: Windows, logits: np.ndarray) -> list[np.ndarray]:
    """The scored rows of one window's logits as log-probabilities, a few rows at a time."""
    rows = logits[windows.first_scored : windows.context - 1]
    return [log_softmax(rows[start : start + ROWS_AT_ONCE]) for start in range(0, len(rows), ROWS_AT_ONCE)]


@dataclass
class Reference:
    """The reference's scored positions: the log-probability of each target, and its top tokens."""

    target_logp: np.ndarray  # (positions,)
    top_ids: np.ndarray  # (positions, TOP_K), most likely first
    top_logp: np.ndarray  # (positions, TOP_K)

    @classmethod
    def from_window_logits(cls, windows: Windows, rows: list[np.ndarray]) -> Reference:
        targets, ids, logps = [], [], []
        for window, logits in enumerate(rows):
            wanted = windows.targets(window)
            done = 0
            for logp in _scored_log_probs(windows, logits):
                order = np.argsort(-logp, axis=-1)[:, :TOP_K]
                targets.append(np.take_along_axis(logp, wanted[done : done + len(logp), None], axis=-1)[:, 0])
                ids.append(order)
                logps.append(np.take_along_axis(logp, order, axis=-1))
                done += len(logp)
        return cls(np.concatenate(targets), np.concatenate(ids).astype(np.int32), np.concatenate(logps))


@dataclass
class Scores:
    """An engine's scored positions against the reference."""

    target_logp: np.ndarray  # the engine's log-probability of each target
    kl: np.ndarray  # KL(reference ‖ engine) at each position
    same_top: np.ndarray  # the engine's most likely token is the reference's

    @classmethod
    def against(cls, reference: Reference, windows: Windows, rows: list[np.ndarray]) -> Scores:
        targets, kls, same = [], [], []
        position = 0
        for window, logits in enumerate(rows):
            wanted = windows.targets(window)
            done = 0
            for logp in _scored_log_probs(windows, logits):
                span = slice(position, position + len(logp))
                targets.append(np.take_along_axis(logp, wanted[done : done + len(logp), None], axis=-1)[:, 0])
                top = np.take_along_axis(logp, reference.top_ids[span].astype(np.int64), axis=-1)
                kls.append(kl_top_k(reference.top_logp[span], top))
                same.append(np.argmax(logp, axis=-1) == reference.top_ids[span, 0])
                done += len(logp)
                position += len(logp)
        return cls(np.concatenate(targets), np.concatenate(kls), np.concatenate(same))


def kl_top_k(reference_logp: np.ndarray, engine_logp: np.ndarray) -> np.ndarray:
    """KL(reference ‖ engine) over the reference's top tokens and one bucket for the rest."""
    p = np.exp(reference_logp.astype(np.float64))
    q = np.exp(engine_logp.astype(np.float64))
    head = (p * (reference_logp - engine_logp)).sum(axis=-1)
    tail_p = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    tail_q = np.clip(1.0 - q.sum(axis=-1), 1e-12, 1.0)
    tail = np.where(tail_p > 1e-12, tail_p * (np.log(np.maximum(tail_p, 1e-300)) - np.log(tail_q)), 0.0)
    return np.maximum(head + tail, 0.0)


def perplexity(target_logp: np.ndarray) -> float:
    return float(np.exp(-np.mean(target_logp)))


@dataclass(frozen=True)
class Quality:
    """An engine's figures against the reference, over the same scored positions."""

    positions: int
    perplexity: float
    reference_perplexity: float
    kl_mean: float
    kl_sem: float  # the mean's standard error, for "measurably less faithful"
    kl_p99: float
    kl_max: float
    same_top_share: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity

    @property
    def perplexity_difference(self) -> float:
        return self.perplexity - self.reference_perplexity

    @classmethod
    def of(cls, scores: Scores, reference: Reference) -> Quality:
        kl = scores.kl
        return cls(
            positions=int(kl.size),
            perplexity=perplexity(scores.target_logp),
            reference_perplexity=perplexity(reference.target_logp),
            kl_mean=float(kl.mean()),
            kl_sem=float(kl.std(ddof=1) / math.sqrt(kl.size)) if kl.size > 1 else 0.0,
            kl_p99=float(np.percentile(kl, 99)),
            kl_max=float(kl.max()),
            same_top_share=float(scores.same_top.mean()),
        )

    def describe(self) -> dict[str, float | int]:
        return {"positions": self.positions, "perplexity": self.perplexity,
                "reference_perplexity": self.reference_perplexity, "perplexity_ratio": self.perplexity_ratio,
                "perplexity_difference": self.perplexity_difference, "kl_mean": self.kl_mean, "kl_sem": self.kl_sem,
                "kl_p99": self.kl_p99, "kl_max": self.kl_max, "same_top_share": self.same_top_share}  # fmt: skip


def matching_prefix(ours: list[int], reference: list[int]) -> int:
    """How many tokens agree before the first difference."""
    for index, (a, b) in enumerate(zip(ours, reference, strict=False)):
        if a != b:
            return index
    return min(len(ours), len(reference))
