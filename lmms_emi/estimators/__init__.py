"""Estimators: tensors in, numbers out, no I/O beyond checkpoint files.

- :mod:`lmms_emi.estimators.club_form` — CLUB's closed form as pure functions of tensors: the O(N·d) point
  estimate (:func:`club_mutual_information`), its weighted form for B row weightings at once
  (:func:`weighted_club_mutual_information`, :class:`WeightedEstimate`: the bootstrap) and the per-sample
  terms whose mean it is (:func:`club_sample_contributions`).
- :mod:`lmms_emi.estimators.club` — the :class:`CLUB` estimator: the q(y|x) network, its fit, scikit-learn's
  fitted protocol.
- :mod:`lmms_emi.estimators.checkpoint` — the checkpoint format (safetensors + :class:`CheckpointManifest`).
- :mod:`lmms_emi.estimators.training` — what the fits share: the seeded re-init of Linear layers, the
  held-out split, the fit arguments' validation, the early-stopping monitor and loop.
- :mod:`lmms_emi.estimators.rjsd` — representation Jensen-Shannon divergence.
- :mod:`lmms_emi.estimators.mi_bounds` — InfoNCE, NWJ and DV (MINE) lower bounds as pure functions of a
  critic's score matrix; :mod:`lmms_emi.estimators.critics` — the critics (separable, concat);
  :mod:`lmms_emi.estimators.critic_mi` — :class:`CriticMI`, the critic estimators' fit, estimate, checkpoint.
- :mod:`lmms_emi.estimators.mmd` — MMD² with a Gaussian kernel (median-heuristic bandwidth).
- :mod:`lmms_emi.estimators.families` — the estimators by name (:data:`MI_ESTIMATORS`,
  :data:`JSD_ESTIMATORS`) and the :class:`MIEstimator` interface.
"""

from lmms_emi.estimators.checkpoint import CheckpointManifest
from lmms_emi.estimators.club import CLUB, CheckpointError, EncoderMismatchError, NotFittedError
from lmms_emi.estimators.club_form import (
    WeightedEstimate,
    club_mutual_information,
    club_sample_contributions,
    weighted_club_mutual_information,
)
from lmms_emi.estimators.critic_mi import CriticMI
from lmms_emi.estimators.families import (
    JSD_ESTIMATORS,
    MI_ESTIMATORS,
    MIEstimator,
    load_mi_estimator,
    make_mi_estimator,
)
from lmms_emi.estimators.mmd import mmd_squared
from lmms_emi.estimators.rjsd import rjsd, rjsd_from_covariances, second_moment

__all__ = [
    "CLUB",
    "JSD_ESTIMATORS",
    "MI_ESTIMATORS",
    "CheckpointError",
    "CheckpointManifest",
    "CriticMI",
    "EncoderMismatchError",
    "MIEstimator",
    "NotFittedError",
    "WeightedEstimate",
    "club_mutual_information",
    "club_sample_contributions",
    "load_mi_estimator",
    "make_mi_estimator",
    "mmd_squared",
    "rjsd",
    "rjsd_from_covariances",
    "second_moment",
    "weighted_club_mutual_information",
]
