"""Input normalisation for the embedding stage: images and texts in, content hashes out.

Images may be ``PIL.Image`` objects, raw encoded bytes, file paths, numpy arrays, or Hugging Face
``datasets`` image dicts (``{"bytes": ..., "path": ...}``).  Each is turned into an :class:`ImageItem`
that carries a content hash (the cache key's content part) and can be decoded to an RGB image later,
off the main thread.  Texts are coerced to ``str`` predictably (``None -> ""``, anything else ``str(x)``).

The work per image is bounded before anything is decoded or resized: an image of more than
:data:`MAX_IMAGE_PIXELS` pixels or a side ratio above :data:`MAX_ASPECT_RATIO` (resizing its short side to an
encoder's input size would make it gigapixels) is an :class:`EmbedInputError` naming the sample.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from lmms_emi.errors import EmbedInputError

#: Largest image accepted, in pixels (8000 × 8000; as RGB 192 MB). PIL's own bomb check is at 179 M.
MAX_IMAGE_PIXELS = 64_000_000
#: Largest ratio of the long to the short side: a 1 × 10000 strip resized to a short side of 224 would be
#: 224 × 2,240,000 pixels; at 100:1 the resized image stays under 5 M pixels.
MAX_ASPECT_RATIO = 100


def check_image_size(size: tuple[int, int], label: str) -> None:
    """Refuse an image whose decoded size is unbounded work (see the module docstring)."""
    width, height = size
    if width < 1 or height < 1:
        raise EmbedInputError(f"image for {label} is empty ({width}×{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise EmbedInputError(
            f"image for {label} is {width}×{height} = {width * height:,} pixels, more than the limit of "
            f"{MAX_IMAGE_PIXELS:,} pixels; downscale it first"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise EmbedInputError(
            f"image for {label} is {width}×{height}, aspect ratio {ratio:.0f}:1, more than the limit of "
            f"{MAX_ASPECT_RATIO}:1 (resizing it for the encoder would blow it up); crop or pad it first"
        )


def describe_sample(index: int, sample_ids: Sequence[Any] | None) -> str:
    """Human-readable name of sample ``index`` for error messages."""
    if sample_ids is not None and index < len(sample_ids):
        return f"sample {sample_ids[index]!r} (index {index})"
    return f"sample at index {index}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ImageItem:
    """One image input: its content hash and whatever is needed to decode it."""

    content_hash: str
    label: str  # names the sample in errors
    data: bytes | None = None  # encoded bytes (file / bytes input)
    image: Image.Image | None = None  # already-decoded input

    def load_rgb(self) -> Image.Image:
        """Decode (if needed) and convert to 3-channel RGB; raises :class:`EmbedInputError`."""
        if self.image is not None:
            check_image_size(self.image.size, self.label)
            return to_rgb(self.image)
        assert self.data is not None
        try:
            with Image.open(io.BytesIO(self.data)) as im:  # reads the header only
                check_image_size(im.size, self.label)
                im.load()
                return to_rgb(im)
        except Image.DecompressionBombError:  # PIL refuses at open when over 2× its own limit
            raise EmbedInputError(
                f"image for {self.label} has more than the limit of {MAX_IMAGE_PIXELS:,} pixels "
                "(too large to decode); downscale it first"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise EmbedInputError(f"image for {self.label} could not be decoded: {exc}") from exc


def _pil_hash(im: Image.Image) -> str:
    h = hashlib.sha256()
    h.update(f"pil|{im.mode}|{im.size}|".encode())
    if im.mode == "P":  # the palette is part of the content
        h.update(bytes(im.getpalette() or []))
    h.update(im.tobytes())
    return h.hexdigest()


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB.

    Transparent images (RGBA, LA, palette with transparency) are composited onto white, i.e. what a
    viewer shows; 16-bit / 32-bit / float greyscale is rescaled to 8 bits by its own min-max range.
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.round().astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def make_image_item(
    obj: Any, index: int, sample_ids: Sequence[Any] | None = None, memo: HashMemo | None = None
) -> ImageItem:
    """Wrap one image input; a missing file or ``None`` raises an error naming the sample.

    Nothing is decoded here: encoded inputs (bytes, files, dataset dicts) are addressed by the sha256 of
    their bytes. ``memo`` (an empty dict shared over the items of one call) hashes each distinct content
    once (a dataset repeats the same image bytes in many rows)."""
    label = describe_sample(index, sample_ids)
    if isinstance(obj, dict):  # HF datasets Image feature when not decoded
        if obj.get("bytes") is not None:
            obj = obj["bytes"]
        elif obj.get("path") is not None:
            obj = obj["path"]
        else:
            raise EmbedInputError(f"image for {label} is missing (dict without 'bytes' or 'path')")
    if obj is None:
        raise EmbedInputError(f"image for {label} is missing (None)")
    if isinstance(obj, Image.Image):
        return ImageItem(_pil_hash(obj), label, image=obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        if not data:
            raise EmbedInputError(f"image for {label} is empty (0 bytes)")
        return ImageItem(_bytes_hash(data, memo), label, data=data)
    if isinstance(obj, str | os.PathLike):
        path = os.fspath(obj)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise EmbedInputError(f"image for {label} could not be read from {path!r}: {exc}") from exc
        if not data:
            raise EmbedInputError(f"image for {label} is empty (0 bytes at {path!r})")
        return ImageItem(_bytes_hash(data, memo), label, data=data)
    if isinstance(obj, np.ndarray):
        arr = obj
        if arr.dtype != np.uint8:
            raise EmbedInputError(f"image array for {label} must be uint8 HxW or HxWxC, got {arr.dtype}")
        try:
            im = Image.fromarray(np.ascontiguousarray(arr))
        except (TypeError, ValueError) as exc:
            raise EmbedInputError(f"image array for {label} has unusable shape {arr.shape}") from exc
        return ImageItem(_pil_hash(im), label, image=im)
    raise EmbedInputError(f"image for {label} has unsupported type {type(obj).__name__}")


HashMemo = dict[tuple[int, bytes, bytes], list[tuple[bytes, str]]]


def _bytes_hash(data: bytes, memo: HashMemo | None) -> str:
    """sha256 of ``data``, computed once per distinct content of a call: contents are grouped by length and
    their first and last bytes, and compared in full (memcmp, far cheaper than hashing) within a group."""
    if memo is None:
        return sha256_hex(data)
    group = memo.setdefault((len(data), data[:64], data[-64:]), [])
    for seen, digest in group:
        if seen == data:
            return digest
    digest = sha256_hex(data)
    group.append((data, digest))
    return digest


def check_sequence(obj: Any, what: str) -> None:
    """A lone string / bytes / image is a common mistake for a one-element list: refuse it."""
    if isinstance(obj, str | bytes | Image.Image | os.PathLike):
        raise TypeError(f"{what} must be a sequence of items, not a single {type(obj).__name__}")


def coerce_texts(texts: Sequence[Any], sample_ids: Sequence[Any] | None = None) -> tuple[list[str], int]:
    """Convert every entry to ``str``: ``None -> ""``, ``bytes`` decoded as UTF-8, others ``str(x)``.

    Returns the strings and how many entries were not already strings (the caller warns once).
    Nothing is dropped or altered: the output has the same length as the input, and bytes that are not
    UTF-8 or a string with an unpaired surrogate (not encodable text) raise :class:`EmbedInputError` naming
    the sample (``sample_ids[i]``, else its index).
    """
    out: list[str] = []
    converted = 0
    for i, t in enumerate(texts):
        if isinstance(t, str):
            _check_unicode(t, i, sample_ids)
            out.append(t)
            continue
        converted += 1
        if t is None:
            out.append("")
        elif isinstance(t, bytes | bytearray):
            try:
                out.append(bytes(t).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise EmbedInputError(
                    f"text of {describe_sample(i, sample_ids)} is not UTF-8 (byte {t[exc.start]:#04x} at "
                    f"offset {exc.start})"
                ) from None
        else:
            out.append(str(t))
    return out, converted


def _check_unicode(text: str, index: int, sample_ids: Sequence[Any] | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EmbedInputError(
            f"text of {describe_sample(index, sample_ids)} is not valid Unicode (unpaired surrogate "
            f"{text[exc.start]!r} at position {exc.start}: {text[max(0, exc.start - 20) : exc.start]!r}...)"
        ) from None


def text_hash(text: str) -> str:
    return sha256_hex(b"text|" + text.encode("utf-8"))
