"""Multi-process embedding: shard the unique items over ranks, embed, all-gather in order.

Works under ``torchrun`` and ``accelerate launch`` (both initialise ``torch.distributed``), with
gloo on CPU or NCCL on GPU.  Every rank must call with the same item list (it is a collective).
Rank ``r`` of ``W`` takes the strided shard ``r, r+W, r+2W, ...``; the gathered result is put back
into the original item order, so one process and many give the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def dist_context() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, or ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Strided shard of ``range(n)`` for ``rank`` (balanced to within one item)."""
    return list(range(rank, n, world_size))


def gather_rows(local_indices: Sequence[int], local_rows: torch.Tensor, n: int) -> torch.Tensor:
    """All-gather ``(indices, rows)`` from every rank into one ``[n, d]`` CPU tensor in index order.

    Uses ``all_gather_object`` (pickled numpy float32, bit-exact), which works with gloo and NCCL.
    """
    import torch.distributed as dist

    _, world = dist_context()
    payload = (list(local_indices), local_rows.detach().to("cpu", torch.float32).numpy())
    if world == 1:
        parts = [payload]
    else:
        parts = [None] * world
        dist.all_gather_object(parts, payload)
    dim = next((rows.shape[1] for _, rows in parts if rows.ndim == 2 and rows.shape[0]), local_rows.shape[-1])
    out = np.zeros((n, dim), dtype=np.float32)
    filled = np.zeros(n, dtype=bool)
    for idx, rows in parts:
        if len(idx):
            out[idx] = rows
            filled[idx] = True
    if not filled.all():
        missing = np.flatnonzero(~filled)[:5].tolist()
        raise RuntimeError(
            f"distributed gather left rows unfilled (e.g. {missing}); ranks disagreed on inputs"
        )
    return torch.from_numpy(out)


def shard_and_gather(n: int, compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """Run ``compute(indices) -> [len(indices), d]`` on this rank's shard of ``range(n)`` and return
    the full ``[n, d]`` result on every rank (a no-op wrapper when not distributed)."""
    rank, world = dist_context()
    idx = shard_indices(n, rank, world)
    rows = compute(idx)
    if world == 1:
        return rows
    return gather_rows(idx, rows, n)
