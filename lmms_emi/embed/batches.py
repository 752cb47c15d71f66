"""The batched forward passes of one encoder: items in, ``n(P f(x))`` rows out.

Items are cut into batches (texts sorted by length, so that batches pad less); worker threads decode and
preprocess the next batches while the model runs the current one; each batch's raw features are projected
(when a projection applies) and L2-normalised in float32 on the device, then moved to the CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

from .encoders import Encoder, EncoderBatch
from .stats import ModalityStats


def forward_batch(
    enc: Encoder,
    prepared: EncoderBatch,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    projection: torch.Tensor | None,
) -> torch.Tensor:
    """``n(P f(x))`` for one batch, float32 on CPU (autocast to ``amp_dtype`` inside the encoder only)."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in prepared.inputs.items()}
    autocast = contextlib.nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)
    with torch.inference_mode():
        with autocast:
            raw = enc.forward(inputs)
        raw = raw.float()  # projection and normalisation in float32
        if projection is not None:
            raw = raw @ projection
        z = F.normalize(raw, dim=-1)
    return z.to("cpu")


def encode_batches(
    enc: Encoder,
    modality: str,
    payloads: list[Any],
    *,
    dim: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    projection: torch.Tensor | None,
    stats: ModalityStats,
    progress: bool,
    on_batch: Callable[[list[int], torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """``[len(payloads), dim]`` rows in payload order, and the texts the encoder truncated.

    ``payloads``: image items (decoded here, in the worker threads) or texts. ``on_batch(positions, rows)``
    is called after each forward pass (e.g. to store the rows); ``stats`` counts the batches, calls and time.
    """
    from tqdm.auto import tqdm

    m = len(payloads)
    order = list(range(m))
    if modality == "text":  # length-sorted batches pad less
        order.sort(key=lambda i: -len(payloads[i]))
    batches = [order[i : i + batch_size] for i in range(0, m, batch_size)]

    def prep(batch: list[int]) -> EncoderBatch:
        items = [payloads[i] for i in batch]
        if modality == "image":
            items = [it.load_rgb() for it in items]  # ImageItem -> RGB PIL (decode off the main thread)
        return enc.prepare(items)

    out = torch.empty(m, dim, dtype=torch.float32)
    t0 = time.perf_counter()
    truncated: list[str] = []
    bar = tqdm(
        total=m, desc=f"embedding {modality}s [{enc.name}]", unit=modality, leave=False, disable=not progress
    )
    pool = ThreadPoolExecutor(max_workers=num_workers) if num_workers > 0 else None
    submit: Callable[[list[int]], Future[EncoderBatch] | EncoderBatch]
    submit = (lambda b: pool.submit(prep, b)) if pool else prep
    try:
        pending: deque[Future[EncoderBatch] | EncoderBatch] = deque(
            submit(b) for b in batches[: num_workers + 1]
        )
        nxt = len(pending)
        for batch in batches:
            head = pending.popleft()
            prepared = head.result() if isinstance(head, Future) else head
            if nxt < len(batches):
                pending.append(submit(batches[nxt]))
                nxt += 1
            tf = time.perf_counter()
            z = forward_batch(enc, prepared, device, amp_dtype, projection)
            stats.forward_seconds += time.perf_counter() - tf
            out[batch] = z
            if on_batch is not None:
                on_batch(batch, z)
            truncated += [payloads[batch[i]] for i in prepared.truncated]
            stats.forward_passes += 1
            bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    stats.encoder_calls += m
    stats.seconds += time.perf_counter() - t0
    stats.truncated += len(truncated)
    return out, truncated
