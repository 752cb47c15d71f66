"""Estimators: tensors in, numbers out, no I/O beyond checkpoint files.

- :mod:`lmms_emi.estimators.club_form` — CLUB's closed form as pure functions of tensors: the O(N·d) point
  estimate (:func:`club_mutual_information`), its weighted form for B row weightings at once
  (:func:`weighted_club_mutual_information`, :class:`WeightedEstimate`: the bootstrap) and the per-sample
  terms whose mean it is (:func:`club_sample_contributions`).
- :mod:`lmms_emi.estimators.club` — the :class:`CLUB` estimator: the q(y|x) network, its fit, scikit-learn's
  fitted protocol.
- :mod:`lmms_emi.estimators.checkpoint` — the checkpoint format (safetensors + :class:`CheckpointManifest`).
- :mod:`lmms_emi.estimators.rjsd` — representation Jensen-Shannon divergence.
"""

from lmms_emi.estimators.checkpoint import CheckpointManifest
from lmms_emi.estimators.club import CLUB, CheckpointError, EncoderMismatchError, NotFittedError
from lmms_emi.estimators.club_form import (
    WeightedEstimate,
    club_mutual_information,
    club_sample_contributions,
    weighted_club_mutual_information,
)
from lmms_emi.estimators.rjsd import rjsd, rjsd_from_covariances, second_moment

__all__ = [
    "CLUB",
    "CheckpointError",
    "CheckpointManifest",
    "EncoderMismatchError",
    "NotFittedError",
    "WeightedEstimate",
    "club_mutual_information",
    "club_sample_contributions",
    "rjsd",
    "rjsd_from_covariances",
    "second_moment",
    "weighted_club_mutual_information",
]
