"""Visual shifts: the corruptions of the ``imagecorruptions`` package (Hendrycks & Dietterich's ImageNet-C
code), by name and severity, exactly as the package computes them.

A corruption's randomness (frost's texture and crop, the noises, glass blur's shuffles, ...) comes from
NumPy's global generator, which the package reads; :func:`apply_corruption` seeds it with the row's seed
for the call and puts the caller's state back afterwards, so the output is a function of (image, name,
severity, seed) and nobody else's random numbers move.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmms_emi.errors import UsageError
from lmms_emi.shifts.compat import load_imagecorruptions

__all__ = [
    "CORRUPTION_NAMES",
    "MIN_SIDE",
    "SEVERITIES",
    "VisualShift",
    "apply_corruption",
    "corrupt_image_bytes",
    "parse_visual_shift",
]

#: every corruption of imagecorruptions 1.1.2 (its ``get_corruption_names('all')``, in its order)
CORRUPTION_NAMES: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIDE = 32  # imagecorruptions refuses smaller images
_SEEDED = threading.Lock()  # seed -> corrupt -> restore of NumPy's global generator is one step


@dataclass(frozen=True)
class VisualShift:
    """One imagecorruptions corruption at one severity (1-5)."""

    corruption: str
    severity: int

    def __post_init__(self) -> None:
        if self.corruption not in CORRUPTION_NAMES:
            raise UsageError(
                f"--visual {self.corruption}_{self.severity}: unknown corruption {self.corruption!r}; "
                f"imagecorruptions has {', '.join(CORRUPTION_NAMES)}"
            )
        if self.severity not in SEVERITIES:
            raise UsageError(
                f"--visual {self.corruption}_{self.severity}: severity {self.severity} is out of range 1-5"
            )

    @property
    def name(self) -> str:
        """``<corruption>_<severity>``, as in the paper's split names (``defocus_blur_3``)."""
        return f"{self.corruption}_{self.severity}"

    def params(self) -> dict[str, Any]:
        return {"package": "imagecorruptions", "corruption": self.corruption, "severity": self.severity}


def parse_visual_shift(spec: str) -> VisualShift:
    """``"frost_3"`` -> ``VisualShift("frost", 3)``; UsageError naming the option when malformed.

    >>> parse_visual_shift("defocus_blur_5")
    VisualShift(corruption='defocus_blur', severity=5)
    """
    name, _, level = spec.strip().rpartition("_")
    if not name or not level.lstrip("-").isdigit():
        raise UsageError(
            f"--visual {spec}: expected <corruption>_<severity>, e.g. frost_3 (corruptions: "
            f"{', '.join(CORRUPTION_NAMES)})"
        )
    return VisualShift(name, int(level))


def apply_corruption(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``imagecorruptions.corrupt(image, severity, corruption)`` with NumPy's global generator seeded by
    ``seed`` for the call (the caller's generator state is restored). ``image``: uint8, (H, W, 3) or (H, W),
    both sides at least 32 px; returns uint8 (H, W, 3)."""
    package = load_imagecorruptions()
    with _SEEDED:
        state = np.random.get_state()  # noqa: NPY002 (imagecorruptions reads the global generator)
        try:
            np.random.seed(seed % 2**32)  # noqa: NPY002
            return package.corrupt(image, severity=severity, corruption_name=corruption)
        finally:
            np.random.set_state(state)  # noqa: NPY002


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 RGB array (H, W, 3)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def encode_png(array: np.ndarray) -> bytes:
    """A uint8 array as PNG bytes (lossless, deterministic for the same pixels)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_image_bytes(data: bytes, corruption: str, severity: int, seed: int) -> bytes:
    """Encoded source image -> PNG bytes of its corrupted RGB version (what a worker process runs)."""
    return encode_png(apply_corruption(decode_rgb(data), corruption, severity, seed))
