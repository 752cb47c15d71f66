"""The :class:`Embedder`: raw samples in, L2-normalised float32 features out.

For sample ``i`` with image ``v_i``, question ``t_i``, model response ``y_i`` and reference ``y*_i``::

    z_v = n(P_v f_vision(v_i)),  z_t = n(P_t f_text(t_i)),
    z_model = n(P_t f_text(y_i)), z_ref = n(P_t f_text(y*_i)),      n(x) = x / ||x||_2

where ``f`` are the encoder features (see :mod:`lmms_emi.embed.encoders`) and ``P`` is the identity,
except when the two encoders' dimensions differ: then the larger one is mapped onto the smaller
with a fixed Gaussian random projection (:mod:`lmms_emi.embed.projection`) so that the query average
``(z_v + z_t) / 2`` is defined.

Every unique content (image bytes / text) is embedded once per encoder: duplicates inside a call
are collapsed, and results live in a content-addressed disk cache shared by all scenarios and runs.

Encoders are loaded lazily: what each encoder is (name, feature, layer, dimension, cache identity) is
read from its configuration when the Embedder is built, and its weights are loaded only when an item
misses the cache.  A run whose embeddings are all cached loads no model and decodes no image.

Over 400 lines: the :class:`Embedder` class alone is about 390 (lazy loading, cache look-ups, batching
and projection in one object's state); its helpers live in ``profiles``, ``batches``, ``projection``,
``stats`` and ``cache``.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from lmms_emi.emi import TaskEmbeddings
from lmms_emi.errors import EncoderLoadError

from .batches import encode_batches
from .cache import CacheWriter, EmbeddingCache, cache_key, default_cache_dir, user_warning
from .encoders import Encoder, EncoderInfo, JointQueryItem, describe_encoder, is_joint_query, load_encoder
from .inputs import HashMemo, check_sequence, coerce_texts, make_image_item, text_hash
from .profiles import PROFILES, encoder_spec_of
from .projection import DEFAULT_PROJECTION_SEED, projections_for
from .stats import EmbedStats

_MODALITY = {"vision": "image", "images": "image", "texts": "text"}


class Embedder:
    """Embeds images and texts with a vision and a text encoder, with dedup, disk cache and batching.

    Args:
        vision, text: registry name (``"hf-clip:<id|dir>"``, ``"open_clip:<arch>[:<pretrained>]"``,
            ``"efficientnet_lite0"``, ``"hf-text:<id|dir>"``, ``"minilm"``), a hub id or local
            directory (default backend of the modality), or an :class:`Encoder` instance.
        text_layer: hidden layer of the text encoder (0 = embedding output; negative counts from the end).
        cache_dir: cache directory; ``None`` = ``$LMMS_EMI_EMBEDDING_CACHE``, else the user cache folder's
            ``lmms_emi/embeddings`` (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux);
            ``False`` disables the disk cache (in-call dedup still applies).
        batch_size: items per forward pass.
        device: torch device; default CUDA when available, else CPU.
        progress: show tqdm progress bars.
        precision: ``"auto"`` (bf16 autocast on CUDA when supported, else fp16; fp32 on CPU),
            ``"fp32"``, ``"bf16"`` or ``"fp16"``.  Part of the cache key.
        num_workers: threads that decode and preprocess the next batches while the model runs (0 = inline).
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
        self.projections = projections_for(dv, dt, projection_seed)
        self.dim = min(dv, dt)
        self._proj_mats: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_profile(cls, profile: str, **overrides: Any) -> Embedder:
        """``"paper"`` (CLIP ViT-B/32 patch mean + XLM-R-base layer 0), ``"offline"`` (EfficientNet-Lite0 +
        all-MiniLM-L6-v2 last layer, vision projected 1280 -> 384), ``"e5v-disjoint"`` or ``"e5v-joint"``
        (:mod:`lmms_emi.embed.encoders.e5v`)."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
        try:
            return cls(**{**PROFILES[profile], **overrides})
        except EncoderLoadError as exc:  # one line that names the encoder and the ways out
            first = str(exc).splitlines()[0]
            head = re.match(r"(could not load .*?'[^']*')", first)  # drop the library's long explanation
            backends = [str(PROFILES[profile][m]).partition(":")[0] for m in ("vision", "text")]
            local = (  # E5-V folders are not recognised by their config: the backend is named
                f"--vision-encoder {backends[0]}:DIR --text-encoder {backends[1]}:DIR"
                if profile.startswith("e5v")
                else "--vision-encoder / --text-encoder DIR"
            )
            raise EncoderLoadError(
                f"{head.group(1) if head else first} — the '{profile}' encoders need the Hugging Face hub or "
                f"local copies ({local}), or use --encoders offline"
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
        return encoder_spec_of(self._infos, self.projections)

    @property
    def joint_query(self) -> bool:
        """Whether the image encoder embeds each image with its question (e.g. E5-V "joint"): then
        :meth:`embed_queries` gives the query embedding, recorded as both z_v and z_t (z_x is that vector)."""
        return is_joint_query(self._infos["image"])

    def embed_queries(
        self, images: Sequence[Any], questions: Sequence[Any], sample_ids: Sequence[Any] | None = None
    ) -> torch.Tensor:
        """``[N, d]`` joint query embeddings of (image, question) pairs (a joint-query image encoder only)."""
        if not self.joint_query:
            raise ValueError(f"the image encoder {self._infos['image'].name!r} embeds images, not queries")
        check_sequence(images, "images")
        check_sequence(questions, "questions")
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        memo: HashMemo = {}
        with self._lock:
            texts = self._coerce(questions, "question", sample_ids)
            items = [
                JointQueryItem(make_image_item(x, i, sample_ids, memo), q)
                for i, (x, q) in enumerate(zip(images, texts, strict=True))
            ]
            keys = [text_hash(f"{it.image.content_hash}|{text_hash(it.question)}") for it in items]
            return self._embed("image", keys, items)

    def embed_images(self, images: Sequence[Any], sample_ids: Sequence[Any] | None = None) -> torch.Tensor:
        """``[N, d]`` features of PIL images, encoded bytes, paths, uint8 arrays or HF image dicts.

        A missing/unreadable image raises :class:`~lmms_emi.embed.EmbedInputError` naming the
        sample (its id from ``sample_ids`` when given, else its index)."""
        if self.joint_query:
            raise ValueError("a joint-query image encoder embeds (image, question) pairs: use embed_queries")
        check_sequence(images, "images")
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
        check_sequence(texts, "texts")
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
            if self.joint_query:  # z_v = z_t = the joint query embedding, so z_x = (z_v + z_t) / 2 is it
                z_v = self.embed_queries(images, questions, sample_ids=sample_ids)
                texts, roles = [], []
            else:
                z_v = self.embed_images(images, sample_ids=sample_ids)
                texts, roles = self._coerce(questions, "question"), ["questions"]
            if responses is not None:
                texts += self._coerce(responses, "response")
                roles.append("responses")
            if references is not None:
                texts += self._coerce(references, "reference")
                roles.append("references")
            z = self._embed("text", [text_hash(s) for s in texts], texts)
        chunks = z.split(n) if n and roles else [z] * len(roles)  # n == 0: empty [0, d] matrices
        parts = dict(zip(roles, chunks, strict=True)) | ({"questions": z_v} if self.joint_query else {})
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
        """Dedup -> cache/encode -> expand back to input order."""
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

        rows = self._resolve(modality, [keys[i] for i in uniq], [payloads[i] for i in uniq])
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
            writer = CacheWriter(self.cache, self._produced_by()) if self.cache is not None else None

            def store(positions: list[int], z: torch.Tensor) -> None:
                if writer is not None:
                    writer.submit([ckeys[misses[j]] for j in positions], z)

            try:
                out[misses] = self._encode(modality, [payloads[i] for i in misses], store)
                failed = writer.wait() if writer is not None else None  # entries are on disk on return
            finally:
                if writer is not None:
                    writer.close()
            if failed is not None and writer is not None:
                self.cache = None  # the rest of the run goes without it
                self._warn_once(
                    "cache-write",
                    f"could not write to the embedding cache {writer.cache.root} ({failed}); "
                    "continuing without the cache",
                )
        return out

    def _produced_by(self) -> dict[str, Any]:
        """What computed a vector, recorded in its cache entry (not in its key: vectors of one input differ
        by ~1e-7 between batch sizes and devices, and the first computed one is served from then on)."""
        return {"batch_size": self.batch_size, "device": self.device.type, "torch": torch.__version__}

    def _encode(
        self,
        modality: str,
        payloads: list[Any],
        on_batch: Callable[[list[int], torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Rows of ``payloads`` from the (loaded) encoder, with one warning about truncated texts."""
        enc = self._encoder(modality)
        out, truncated = encode_batches(
            enc,
            modality,
            payloads,
            dim=self.dim,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            amp_dtype=self.amp_dtype,
            projection=self._projection(modality),
            stats=getattr(self.stats, modality),
            progress=self.progress,
            on_batch=on_batch,
        )
        if truncated:
            self._warn_once(
                "truncated",
                f"{len(truncated)} text(s) longer than the text encoder's max length "
                f"({getattr(enc, 'max_length', '?')} tokens) were truncated, e.g. {truncated[0][:60]!r}... "
                "(warning shown once)",
            )
        return out
