"""The leaderboard's inputs: the runs' results JSON files (finding, reading, naming them), where a run's
saved artifacts are (its embeddings file, its estimator file), and whether two runs can be ranked together:
the same encoders and an estimator of the same content (tensors or file sha256), whatever its source."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmms_emi.encoder_spec import spec_differences
from lmms_emi.errors import UsageError

__all__ = [
    "RESULTS_GLOB",
    "RESULTS_SUFFIX",
    "Inputs",
    "RunResults",
    "comparability_problems",
    "encoders_label",
    "estimator_identity",
    "estimator_label",
    "find_results_files",
    "load_run",
    "load_runs",
    "same_estimator",
]

RESULTS_GLOB = "*_results.json"
RESULTS_SUFFIX = "_results.json"


@dataclass(frozen=True)
class Inputs:
    """The results files named by the inputs: ``files`` in order, and which of them were found in a folder
    (those are skipped with a note when they hold no EMI; a file named on its own is an error then)."""

    files: list[Path]
    from_folder: frozenset[Path] = frozenset()


def find_results_files(inputs: Sequence[str | Path]) -> Inputs:
    """The results files named by ``inputs``: files as given, folders searched recursively for
    ``*_results.json`` (sorted); duplicates dropped. UsageError for a missing path or an empty folder."""
    if not inputs:
        raise UsageError("no runs given: name lmms-eval results JSON files or the folders holding them")
    files: list[tuple[Path, bool]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob(RESULTS_GLOB) if p.is_file())
            if not found:
                raise UsageError(
                    f"{path}: no {RESULTS_GLOB} file in this folder (an lmms-eval --output_path?)"
                )
            files.extend((f, True) for f in found)
        elif path.is_file():
            files.append((path, False))
        else:
            raise UsageError(f"{path}: no such file or folder")
    seen: dict[Path, int] = {}
    out: list[Path] = []
    folder: set[Path] = set()
    for f, in_folder in files:
        key = f.resolve()
        if key in seen:
            if not in_folder:  # named on its own too: errors are not skipped
                folder.discard(out[seen[key]])
            continue
        seen[key] = len(out)
        out.append(f)
        if in_folder:
            folder.add(f)
    return Inputs(out, frozenset(folder))


@dataclass(frozen=True)
class RunResults:
    """One run's results JSON: its model name, run label and the parts the leaderboard reads.
    ``rescored``: the common estimator re-scored it (``--common-estimator``); ``data`` then holds the new
    analyses, the file on disk is unchanged."""

    path: Path
    model: str
    run: str
    data: dict[str, Any]
    rescored: bool = field(default=False, compare=False)

    @property
    def emi(self) -> dict[str, Any]:
        return self.data["lmms_emi"]

    @property
    def estimator(self) -> dict[str, Any]:
        return self.emi.get("estimator") or {}

    @property
    def encoders(self) -> dict[str, Any]:
        return self.estimator.get("encoders") or self.emi.get("encoders") or {}

    @property
    def analyses(self) -> dict[str, dict[str, Any]]:
        """Benchmark (or single task) -> its analysis dict (``ShiftAnalysis.to_dict``)."""
        return {**(self.emi.get("benchmarks") or {}), **(self.emi.get("tasks") or {})}

    @property
    def label(self) -> str:
        return f"{self.path} (model {self.model})"

    @property
    def run_id(self) -> str:
        """The id its files carry: the results file's name without ``_results.json``."""
        return self.path.name.removesuffix(RESULTS_SUFFIX).removesuffix(".json")

    def artifact(self, kind: str) -> Path | None:
        """The run's saved ``"embeddings"`` or ``"estimator"`` file: as recorded in its results JSON
        (``lmms_emi.reports.run``), else beside the results file under the run's id; None when absent."""
        from lmms_emi.embed.store import EMBEDDINGS_FILE  # (imports torch: only when artifacts are needed)
        from lmms_emi.pipeline.estimator import FITTED_CHECKPOINT_NAME

        recorded = ((self.emi.get("reports") or {}).get("run") or {}).get(kind)
        candidates = [Path(recorded)] if recorded else []
        if recorded and not Path(recorded).is_absolute():
            candidates.append(self.path.parent / recorded)
        name = {"embeddings": EMBEDDINGS_FILE, "estimator": FITTED_CHECKPOINT_NAME}[kind]
        candidates.append(self.path.parent / f"{self.run_id}_{name}")
        if kind == "estimator" and self.estimator.get("path"):
            candidates.insert(0, Path(str(self.estimator["path"])))
        return next((p for p in candidates if p.is_file()), None)


def _read(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(results dict, "") or (None, why it is not a run with EMI)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"not an lmms-eval results JSON ({type(exc).__name__})"
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or "config" not in data:
        return None, "not an lmms-eval results JSON (no 'results' and 'config' sections)"
    emi = data.get("lmms_emi")
    analyses = {**(emi.get("benchmarks") or {}), **(emi.get("tasks") or {})} if isinstance(emi, dict) else {}
    if not analyses or not all(isinstance(a, dict) and a.get("tasks") for a in analyses.values()):
        return None, (
            "this run has no EMI (a killed or failed run, or one without `lmms-emi eval`, an lmms-emi shift "
            "task or --metrics emi)"
        )
    return data, ""


def load_run(path: str | Path) -> RunResults:
    """Read one results JSON; UsageError when it is not lmms-eval's results or holds no EMI."""
    path = Path(path)
    data, why = _read(path)
    if data is None:
        raise UsageError(f"{path}: {why}")
    return RunResults(path, _model_name(data), _run_label(path, data), data)


def load_runs(inputs: Sequence[str | Path]) -> tuple[list[RunResults], list[str]]:
    """The runs named by ``inputs`` (:func:`find_results_files`) and notes for the files skipped: a results
    file found in a folder that holds no EMI or is not readable (a killed or failed run) is skipped, with
    one note naming it; a file named on its own is an error (UsageError), as is no run left."""
    found = find_results_files(inputs)
    runs: list[RunResults] = []
    notes: list[str] = []
    for path in found.files:
        data, why = _read(path)
        if data is not None:
            runs.append(RunResults(path, _model_name(data), _run_label(path, data), data))
        elif path in found.from_folder:
            notes.append(f"skipped {path}: {why}")
        else:
            raise UsageError(f"{path}: {why}")
    if not runs:
        raise UsageError(f"no run with EMI among {len(found.files)} results file(s): {notes[0]}")
    return runs, notes


def _model_name(data: Mapping[str, Any]) -> str:
    emi = data.get("lmms_emi") or {}
    for analysis in {**(emi.get("benchmarks") or {}), **(emi.get("tasks") or {})}.values():
        name = (analysis.get("metadata") or {}).get("model")
        if name:
            return str(name)
    config = data.get("config") or {}
    return str(data.get("model_name") or config.get("model") or "unknown")


def _run_label(path: Path, data: Mapping[str, Any]) -> str:
    """The id the run's files carry (``<id>_results.json``: two runs of one second are ``<id>`` and
    ``<id>-2``), else lmms-eval's ``date``."""
    stem = path.name.removesuffix(RESULTS_SUFFIX).removesuffix(".json")
    if stem:
        return stem
    date = data.get("date")
    return date if isinstance(date, str) and date else path.name


# --------------------------------------------------------------------------------------- comparability
def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _cached_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    """sha256 of a file, once per (file, size, modification time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_tensors_sha256(path: Path) -> str | None:
    """The ``tensors_sha256`` in the manifest a project checkpoint carries in its safetensors header (read as
    JSON, no tensor loaded; verified against the tensors whenever the file is loaded); None otherwise."""
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= 1 << 24:
                return None
            header = json.loads(fh.read(size))
        manifest = json.loads(header["__metadata__"]["lmms_emi_manifest"])
        return str(manifest["tensors_sha256"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimator_identity(est: Mapping[str, Any]) -> dict[str, str]:
    """Content keys of an estimator, strongest first: the sha256 of its tensors (the checkpoint manifest's
    ``tensors_sha256``: as recorded, else from the file's own manifest when the recorded path exists), the
    sha256 of its file (recorded, else computed from that file), then its registry name and its path (names,
    not content: used only when neither run records content)."""
    sha = est.get("sha256")
    path = est.get("path")
    tensors = (est.get("manifest") or {}).get("tensors_sha256")
    on_disk = Path(str(path)) if path and Path(str(path)).is_file() else None
    if on_disk is not None and not (sha and tensors):
        actual = _file_sha256(on_disk)
        if not sha or sha == actual:  # the file is still the one the run used
            sha, tensors = actual, tensors or _file_tensors_sha256(on_disk)
    keys = {
        "tensors sha256": tensors,
        "file sha256": sha,
        "name": est.get("name"),
        "path": path,
    }
    return {k: str(v) for k, v in keys.items() if v}


def estimator_label(est: Mapping[str, Any]) -> str:
    """A short name for an estimator: its registry name, else its file, with its sha256 prefix."""
    keys = estimator_identity(est)
    head = keys.get("name") or (Path(keys["path"]).name if "path" in keys else est.get("source") or "?")
    if est.get("source") == "fitted" or est.get("comparability") == "run":
        head = f"{head}, fitted on its run"
    if "file sha256" in keys:
        return f"{head} (sha256 {keys['file sha256'][:12]})"
    if "tensors sha256" in keys:
        return f"{head} (tensors sha256 {keys['tensors sha256'][:12]})"
    return str(head)


def same_estimator(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[bool, str]:
    """(whether ``a`` and ``b`` are the same estimator, the key that decided): the first key of
    :func:`estimator_identity` both record. Not the same when they share no key."""
    ka, kb = estimator_identity(a), estimator_identity(b)
    for key in ("tensors sha256", "file sha256", "name", "path"):
        if key in ka and key in kb:
            return ka[key] == kb[key], key
    return False, ""


def encoders_label(enc: Mapping[str, Any]) -> str:
    parts = [f"{side} {(enc.get(side) or {}).get('name')}" for side in ("vision", "text") if enc.get(side)]
    return ", ".join(parts) or "unknown"


def comparability_problems(runs: Sequence[RunResults]) -> dict[Path, list[str]]:
    """Why each run cannot be ranked with the first one: an estimator of other content (or one that cannot
    be identified) or other encoders; each message names what differs. Runs whose estimators are identical
    by content are comparable whatever the estimators' source (registered, a frozen file, fitted on a run).
    Empty when all are comparable."""
    problems: dict[Path, list[str]] = {}
    if len(runs) < 2:
        return problems
    ref = runs[0]
    for run in runs:
        found = []
        if not estimator_identity(run.estimator):
            found.append(f"{run.label} does not record its estimator (no sha256, name or path)")
        elif run is not ref and estimator_identity(ref.estimator):
            same, key = same_estimator(ref.estimator, run.estimator)
            if not same:
                why = f"{key} differs" if key else "the runs record no common key (sha256, name or path)"
                fitted = any(
                    r.estimator.get("comparability") == "run" or r.estimator.get("source") == "fitted"
                    for r in (ref, run)
                )
                hint = "; --common-estimator re-scores the runs with one" if fitted else ""
                found.append(
                    f"estimator differs ({why}): {ref.label} uses {estimator_label(ref.estimator)}, "
                    f"{run.label} uses {estimator_label(run.estimator)}{hint}"
                )
        if run is not ref:
            diff = spec_differences(
                {"encoders": ref.encoders},
                {"encoders": run.encoders},
                expected_label=ref.label,
                actual_label=run.label,
            )
            if diff:
                found.append(f"encoders differ: {'; '.join(diff)}")
        if found:
            problems[run.path] = found
    return problems
