"""Memorization from the model's own likelihood: how much more likely the model finds a training string
than unseen strings of the same grammar likelihood, checkpoint by checkpoint.

Copies among K samples are a sparse endpoint (most strings get 0-3 copies per checkpoint). The dense one,
as in membership-inference work: at every checkpoint, the negative ELBO (nats) of every training string
and of held-out grammar strings; a training string's **likelihood gain** is the mean negative ELBO of its
matched held-out strings (same class, nearest log p(x)) minus its own, i.e. how many nats more likely
the model finds it than strings it never saw that the grammar finds as likely. The held-out strings get
the same gain against *other* held-out strings: their spread is what the gain of a string the model
did not memorize looks like, and a training string counts as memorized from the first checkpoint where its
gain exceeds a high quantile (0.99) of the held-out gains at that checkpoint, a threshold fixed by the
held-out strings alone.
"""

from __future__ import annotations

import numpy as np

from protomem.memorization.tracking import NOT_MEMORIZED


def match_by_logprob(
    logprob: np.ndarray,
    classes: np.ndarray,
    pool_logprob: np.ndarray,
    pool_classes: np.ndarray,
    per_string: int,
    *,
    exclude_self: bool = False,
) -> np.ndarray:
    """(P, per_string) indices into the pool: for each string, the pool strings of its class nearest in
    log p(x) (ties in pool order). With ``exclude_self`` the strings *are* the pool and none is matched to
    itself. A class with fewer pool strings than asked for falls back to the nearest of any class.
    """
    logprob, pool_logprob = np.asarray(logprob, float), np.asarray(pool_logprob, float)
    distance = np.abs(logprob[:, None] - pool_logprob[None, :])
    distance += np.where(np.asarray(classes)[:, None] == np.asarray(pool_classes)[None, :], 0.0, 1e6)
    if exclude_self:
        np.fill_diagonal(distance, np.inf)
    return np.argsort(distance, axis=1, kind="stable")[:, :per_string]


def likelihood_gain(nll: np.ndarray, reference_nll: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """(P, T) nats: mean negative ELBO of each string's matched reference strings minus its own.

    Args:
        nll: (P, T) negative ELBO of the strings at T checkpoints.
        reference_nll: (H, T) the same for the reference (held-out) strings.
        matches: (P, r) indices into the reference strings.
    """
    return np.asarray(reference_nll)[matches].mean(axis=1) - np.asarray(nll)


def gain_thresholds(heldout_gain: np.ndarray, quantile: float = 0.99) -> np.ndarray:
    """(T,) the ``quantile`` of the held-out strings' gains (H, T) at each checkpoint."""
    return np.quantile(np.asarray(heldout_gain, float), quantile, axis=0)


def first_exceeding(
    gain: np.ndarray, thresholds: np.ndarray, steps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """First checkpoint at which each string's gain (P, T) exceeds that checkpoint's threshold (T,).

    Returns (index, step) as :func:`protomem.memorization.tracking.first_memorized`: index T and step
    NOT_MEMORIZED (-1) for strings that never exceed it (censored).
    """
    mask = np.asarray(gain) > np.asarray(thresholds)[None, :]
    ever = mask.any(axis=1)
    index = np.where(ever, mask.argmax(axis=1), mask.shape[1]).astype(np.int64)
    steps = np.asarray(steps, dtype=np.int64)
    step = np.where(ever, steps[np.minimum(index, len(steps) - 1)], NOT_MEMORIZED)
    return index, step.astype(np.int64)
