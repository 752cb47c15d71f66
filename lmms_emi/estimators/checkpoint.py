"""The CLUB checkpoint format: one safetensors file holding the state dict and a JSON manifest.

The manifest (:class:`CheckpointManifest`, stored under the metadata key ``lmms_emi_manifest``) says what
the estimator was trained on: its sizes, the encoder spec of its embeddings, a fingerprint of the fit data
(:func:`fingerprint`), the fit's hyperparameters, and the sha256 of its tensors (:func:`tensors_checksum`),
verified on load. The paper's estimator (``CLUB_global.pt``) is a plain ``torch.save`` state dict without a
manifest; it is read as well and taken to be trained on :data:`~lmms_emi.encoder_spec.PAPER_ENCODERS`.

Every file is also checked for what can be checked without a checksum (the only check a plain state dict or a
manifest written before the checksum existed gets): every tensor finite (:func:`check_finite`) and, once
loaded, the networks' outputs on a seeded probe batch of unit vectors (:func:`probe_batch`,
:func:`check_probe_outputs`) finite with |μ(x)| ≤ :data:`MU_NORM_LIMIT`. A few flipped exponent bits in
``p_mu``'s output layer turn μ into 1e30 and more, and every EMI into nonsense; they are refused here.

Every problem with a file is one :class:`~lmms_emi.errors.CheckpointError` naming the file and what is
wrong; an estimator trained on other encoders than the ones in use is an
:class:`~lmms_emi.errors.EncoderMismatchError` naming the fields that differ.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lmms_emi._io import atomic_write
from lmms_emi.encoder_spec import PAPER_ENCODERS, spec_differences
from lmms_emi.errors import CheckpointError, EncoderMismatchError

__all__ = [
    "CRITIC_FORMAT_NAME",
    "FORMAT_NAME",
    "FORMAT_NAMES",
    "FORMAT_VERSION",
    "MANIFEST_KEY",
    "MU_NORM_LIMIT",
    "PROBE_ROWS",
    "CheckpointManifest",
    "check_encoders",
    "check_finite",
    "check_probe_outputs",
    "check_state",
    "fingerprint",
    "manifest_for",
    "probe_batch",
    "read_checkpoint",
    "tensors_checksum",
    "write_checkpoint",
]

MANIFEST_KEY = "lmms_emi_manifest"
FORMAT_NAME = "lmms-emi-club"
#: The manifest format of the critic MI estimators (InfoNCE, NWJ, MINE: :mod:`.critic_mi`); its
#: ``hyperparameters`` name the estimator, the critic and its sizes. A CLUB's manifest keeps FORMAT_NAME.
CRITIC_FORMAT_NAME = "lmms-emi-critic"
FORMAT_NAMES = (FORMAT_NAME, CRITIC_FORMAT_NAME)
FORMAT_VERSION = 1

#: Largest Euclidean norm |μ(x)| accepted of an estimator's mean on inputs of norm ≤ 1 (on load: the
#: probe batch; in an analysis: every task's queries, :func:`lmms_emi.emi.implausible`). Its targets are unit
#: vectors, so a fitted μ stays near the unit ball (the paper's ``CLUB_global.pt``: |μ| ≤ 3 on random unit
#: vectors); 1e3 is generous and still catches a corrupt output layer (flipped exponent bits give 1e30 and
#: more).
MU_NORM_LIMIT = 1e3
#: Rows of the probe batch (random unit vectors from a fixed seed) run through a loaded estimator.
PROBE_ROWS = 256
_PROBE_SEED = 17


@dataclass(frozen=True)
class CheckpointManifest:
    """What a saved estimator was trained on, stored inside the checkpoint file.

    ``tensors_sha256`` (:func:`tensors_checksum` of the state dict, set by :func:`write_checkpoint`) is
    verified on load; it is '' in checkpoints written before it existed, which load unverified.

    >>> m = CheckpointManifest(x_dim=8, y_dim=8, hidden_size=16, encoders={"text": {"dim": 8}})
    >>> CheckpointManifest.from_json(m.to_json()) == m
    True
    >>> CheckpointManifest.from_json('{"x_dim": "8", "y_dim": 8, "hidden_size": 16, "encoders": {}}')
    Traceback (most recent call last):
    ValueError: manifest field x_dim must be an integer, got '8'
    """

    x_dim: int
    y_dim: int
    hidden_size: int
    encoders: dict[str, Any]
    data_fingerprint: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    tensors_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointManifest:
        """Parse and type-check a manifest; ValueError naming the first bad field."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a manifest must be a JSON object, got {type(data).__name__}")
        kinds = {"x_dim": int, "y_dim": int, "hidden_size": int, "version": int, "encoders": dict}
        kinds.update(hyperparameters=dict, data_fingerprint=str, format=str, tensors_sha256=str)
        names = {int: "an integer", dict: "an object", str: "a string"}
        required = ("x_dim", "y_dim", "hidden_size", "encoders")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"manifest lacks {', '.join(missing)}")
        for key, kind in kinds.items():
            if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
                raise ValueError(f"manifest field {key} must be {names[kind]}, got {data[key]!r}")
        if data.get("format", FORMAT_NAME) not in FORMAT_NAMES:
            raise ValueError(f"manifest of format {data['format']!r}, expected one of {FORMAT_NAMES}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def manifest_for(
    estimator: Any,
    encoders: Mapping[str, Any],
    *,
    architecture: Mapping[str, Any] | None = None,
    format: str = FORMAT_NAME,
) -> CheckpointManifest:
    """The manifest of an estimator with ``x_dim``, ``y_dim``, ``hidden_size`` and ``fit_info_`` (None until
    fitted): its sizes, the encoder spec and, if fitted, the fit's data fingerprint and hyperparameters,
    followed by ``architecture`` (what rebuilds it: a critic's bound and kind)."""
    info = estimator.fit_info_
    return CheckpointManifest(
        x_dim=estimator.x_dim,
        y_dim=estimator.y_dim,
        hidden_size=estimator.hidden_size,
        encoders=dict(encoders),
        data_fingerprint=info.data_fingerprint if info else "",
        hyperparameters={**(dict(info.hyperparameters) if info else {}), **dict(architecture or {})},
        format=format,
    )


def tensors_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (in name order): the manifest's checksum.

    >>> tensors_checksum({"w": torch.zeros(2)}) == tensors_checksum({"w": torch.zeros(2, 1)})
    False
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' float32 bytes and shapes: identifies the data an estimator was fitted on.

    >>> fingerprint(torch.ones(2, 2)) == fingerprint(torch.ones(2, 2, dtype=torch.float64))
    True
    """
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def write_checkpoint(
    path: Path, state: Mapping[str, torch.Tensor], manifest: CheckpointManifest
) -> CheckpointManifest:
    """Write ``state`` and ``manifest`` (its ``tensors_sha256`` set to the state's checksum) as one
    safetensors file, atomically; returns the manifest as written."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    manifest = replace(manifest, tensors_sha256=tensors_checksum(state))
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={MANIFEST_KEY: manifest.to_json()}))
    return manifest


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointManifest | None]:
    """The state dict and manifest (None for a plain torch state dict) of a checkpoint file, its checksum
    and the sizes its manifest declares verified (:class:`~lmms_emi.errors.CheckpointError` otherwise)."""
    if not path.is_file():
        raise CheckpointError(f"estimator checkpoint {path} does not exist")
    state, manifest = _read_file(path)
    if manifest is not None:
        _check_manifest(path, manifest, state)
    check_finite(path, state)
    return state, manifest


def check_finite(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """:class:`~lmms_emi.errors.CheckpointError` naming the file and the first tensor holding NaN or inf."""
    for name in sorted(state):
        t = state[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{path}: tensor {name} contains NaN or inf (the file is corrupt); re-train it "
                "(lmms-emi train-estimator) or copy it again"
            )


def probe_batch(x_dim: int) -> torch.Tensor:
    """The probe inputs of the load check: :data:`PROBE_ROWS` random unit vectors of dim ``x_dim`` from a
    fixed seed (float32, CPU; the same on every machine)."""
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.nn.functional.normalize(torch.randn(PROBE_ROWS, x_dim, generator=gen), dim=1)


def check_state(
    path: Path,
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    exact: bool = False,
) -> None:
    """A checkpoint's tensors against the module's ``expected`` state dict: every tensor present, of its
    shape and finite; with ``exact`` also no tensor the module does not have. CheckpointError naming the file
    and the tensor otherwise."""
    for key, tensor in expected.items():
        got = state.get(key)
        if got is None or tuple(got.shape) != tuple(tensor.shape):
            shape = None if got is None else tuple(got.shape)
            raise CheckpointError(f"{path}: tensor {key} has shape {shape}, expected {tuple(tensor.shape)}")
        if not torch.isfinite(got).all():
            raise CheckpointError(f"{path}: tensor {key} contains NaN or inf")
    extra = sorted(set(state) - set(expected)) if exact else []
    if extra:
        raise CheckpointError(f"{path}: unexpected tensors {', '.join(extra[:3])}")


def check_probe_outputs(path: Path, mu: torch.Tensor, logvar_before_tanh: torch.Tensor) -> None:
    """A loaded estimator's outputs on :func:`probe_batch` are sane: μ(x) and the log σ² head's output before
    its final tanh finite (the tanh itself keeps log σ² in [−1, 1]), and |μ(x)| ≤ :data:`MU_NORM_LIMIT`.
    :class:`~lmms_emi.errors.CheckpointError` naming the file otherwise."""
    advice = "its weights are corrupt; re-train it (lmms-emi train-estimator) or copy it again"
    for what, t in (("μ(x)", mu), ("log σ²(x) before its tanh", logvar_before_tanh)):
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"{path}: the estimator's {what} is NaN or inf on unit-norm inputs: {advice}"
            )
    largest = float(mu.detach().to(torch.float64).norm(dim=1).max()) if mu.numel() else 0.0
    if largest > MU_NORM_LIMIT:
        raise CheckpointError(
            f"{path}: the estimator's mean μ(x) reaches |μ| = {largest:.3g} on unit-norm inputs, where a "
            f"fitted one stays near 1 (limit {MU_NORM_LIMIT:g}): {advice}"
        )


def check_encoders(path: Path, manifest: CheckpointManifest | None, encoders: Mapping[str, Any]) -> None:
    """:class:`~lmms_emi.errors.EncoderMismatchError` naming every differing field when ``encoders`` is not
    the spec the checkpoint was trained on (its manifest's, or :data:`PAPER_ENCODERS` without one)."""
    trained_on = manifest.encoders if manifest else PAPER_ENCODERS
    problems = spec_differences(trained_on, encoders, expected_label="checkpoint has")
    if problems:
        origin = "its manifest" if manifest else "the paper's encoders (plain state dict)"
        raise EncoderMismatchError(
            f"estimator {path} was trained on other encoders ({origin}): " + "; ".join(problems)
        )


def _check_manifest(path: Path, manifest: CheckpointManifest, state: Mapping[str, torch.Tensor]) -> None:
    """The manifest's checksum and sizes agree with the tensors (CheckpointError otherwise)."""
    if manifest.tensors_sha256 and manifest.tensors_sha256 != tensors_checksum(state):
        raise CheckpointError(
            f"{path}: its tensors do not match the checksum in its manifest (the file is corrupt or was "
            "modified after saving); re-train it (lmms-emi train-estimator) or copy it again"
        )
    w0, w2 = state.get("p_mu.0.weight"), state.get("p_mu.2.weight")
    if w0 is None or w2 is None or w0.ndim != 2 or w2.ndim != 2:
        return  # loading the state names the missing or malformed tensor
    found = {"x_dim": w0.shape[1], "y_dim": w2.shape[0], "hidden_size": 2 * w0.shape[0]}
    for key, value in found.items():
        declared = getattr(manifest, key)
        if (declared // 2 * 2 if key == "hidden_size" else declared) != value:  # odd sizes round down
            raise CheckpointError(
                f"{path}: its manifest says {key}={getattr(manifest, key)} but its tensors have "
                f"{key}={value}; the file is inconsistent, re-train or re-save it"
            )


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointManifest | None]:
    """Read a checkpoint file: safetensors (project format) first, then a plain torch state dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        pass  # not safetensors: try the plain torch state dict below
    else:
        manifest = None
        if MANIFEST_KEY in metadata:
            try:
                manifest = CheckpointManifest.from_json(metadata[MANIFEST_KEY])
            except (ValueError, TypeError) as exc:
                raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
        return state, manifest
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt archives
        reason = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({reason})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state), None
