"""Estimators: tensors in, numbers out, no I/O beyond checkpoint files.

- :mod:`lmms_emi.estimators.club` — CLUB mutual-information upper bound: the closed-form O(N·d) estimate
  (:func:`weighted_club_mutual_information` for B row weightings at once, :func:`club_mutual_information`
  its uniform case) and the :class:`CLUB` estimator (fit, checkpoints, scikit-learn's fitted protocol).
- :mod:`lmms_emi.estimators.rjsd` — representation Jensen-Shannon divergence.
"""

from lmms_emi.estimators.club import (
    CLUB,
    PAPER_ENCODERS,
    CheckpointError,
    CheckpointManifest,
    EncoderMismatchError,
    NotFittedError,
    club_mutual_information,
    weighted_club_mutual_information,
)
from lmms_emi.estimators.rjsd import rjsd, rjsd_from_covariances, second_moment

__all__ = [
    "CLUB",
    "PAPER_ENCODERS",
    "CheckpointError",
    "CheckpointManifest",
    "EncoderMismatchError",
    "NotFittedError",
    "club_mutual_information",
    "rjsd",
    "rjsd_from_covariances",
    "second_moment",
    "weighted_club_mutual_information",
]
