"""Shared builders for the analysis / report / CLI tests: random unit embeddings and small estimators."""

from __future__ import annotations

import torch

from lmms_emi import scenarios as sc
from lmms_emi.emi import TaskEmbeddings
from lmms_emi.estimators.club import CLUB

ID_TASK = sc.id_scenario("synthetic").task


def unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)


def shifted_tasks(
    n_ood: int = 5, *, n: int = 24, d: int = 16, seed: int = 0, references: bool = True
) -> dict[str, TaskEmbeddings]:
    """The ID task plus ``n_ood`` synthetic OOD tasks whose image/text queries and responses drift away from
    the ID ones by a growing amount, so EMID and the bound both grow (real values, no stand-ins)."""
    gen = torch.Generator().manual_seed(seed)
    base_v, base_t, ref = unit(n, d, gen), unit(n, d, gen), unit(n, d, gen)
    names = [s.task for s in sc.synthetic_scenarios()[: n_ood + 1]]
    out = {}
    for k, name in enumerate(names):
        drift = 0.35 * k
        z_v = torch.nn.functional.normalize(base_v + drift * unit(n, d, gen), dim=-1)
        z_t = torch.nn.functional.normalize(base_t + drift * unit(n, d, gen), dim=-1)
        z_model = torch.nn.functional.normalize(ref + (0.2 + drift) * unit(n, d, gen), dim=-1)
        out[name] = TaskEmbeddings(z_v, z_t, z_model, ref.clone() if references else None)
    return out


def small_club(d: int = 16, seed: int = 0) -> CLUB:
    """A small CLUB with seeded random weights (its estimates are real numbers of a real estimator), marked
    fitted by loading its own state dict, as a checkpoint would be."""
    club = CLUB(d, d, hidden_size=16)
    club.reset_parameters(seed)
    club.load_state_dict(club.state_dict())
    return club.eval()


def artifact(folder, name: str):
    """The one file of a run named ``<run id>_<name>`` in ``folder`` (a run's files carry its id)."""
    from pathlib import Path

    matches = sorted(Path(folder).glob(f"*_{name}"))
    assert len(matches) == 1, (folder, name, [p.name for p in matches])
    return matches[0]
