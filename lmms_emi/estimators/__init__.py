"""Estimators: tensors in, numbers out, no I/O beyond checkpoint files.

- :mod:`lmms_emi.estimators.club` — CLUB mutual-information upper bound (closed-form O(N·d) estimate).
- :mod:`lmms_emi.estimators.rjsd` — representation Jensen-Shannon divergence.
"""

from lmms_emi.estimators.club import (
    CLUB,
    PAPER_ENCODERS,
    CheckpointError,
    CheckpointManifest,
    EncoderMismatchError,
    club_mutual_information,
)
from lmms_emi.estimators.rjsd import rjsd, rjsd_from_covariances, second_moment

__all__ = [
    "CLUB",
    "PAPER_ENCODERS",
    "CheckpointError",
    "CheckpointManifest",
    "EncoderMismatchError",
    "club_mutual_information",
    "rjsd",
    "rjsd_from_covariances",
    "second_moment",
]
