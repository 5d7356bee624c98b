"""Memorization detectors: exact and hierarchical (block) copies, tracking over training, slop.

- :mod:`protomem.memorization.hierarchy`: classify generated RHM strings against a training set (exact
  copy of string i, per-level block copies with their exact chance rates, novel valid, invalid with the
  lowest failing level, Hamming distance to the nearest training string).
- :mod:`protomem.memorization.tracking`: copies of every training string per checkpoint, the grammar's
  expectation K·p(x), the first memorized step.
- :mod:`protomem.memorization.likelihood`: the dense endpoint: each training string's likelihood gain
  (negative ELBO of matched held-out strings minus its own) and the first checkpoint it beats the held-out
  strings' own spread.
- :mod:`protomem.memorization.slop`: how often samples reproduce each training block, against the training
  set and the grammar.
- :mod:`protomem.memorization.near`, :mod:`protomem.memorization.text`: near-copy and text detectors used by
  ``protomem audit``.
"""

from protomem.memorization.hierarchy import (
    Classification,
    block_holders,
    block_probability,
    chance_block_copy_fraction,
    classify_samples,
)
from protomem.memorization.tracking import (
    copies_per_checkpoint,
    expected_copies,
    first_memorized,
    memorized_mask,
    not_yet_memorized_curve,
)

__all__ = [
    "Classification",
    "block_holders",
    "block_probability",
    "chance_block_copy_fraction",
    "classify_samples",
    "copies_per_checkpoint",
    "expected_copies",
    "first_memorized",
    "memorized_mask",
    "not_yet_memorized_curve",
]
