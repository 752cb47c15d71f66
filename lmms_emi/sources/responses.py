"""Saved model responses: JSONL files named ``<scenario>_<model>.jsonl``, one JSON object a line.

Each line needs ``question_id`` (int) and ``text`` (the response); other keys (``prompt``, ``answer_id``,
``model_id``, ``metadata`` in the paper's files) are kept but not required. Two optional keys carry the
model's token log-probabilities (natural log, each a finite number <= 0), which estimate the bound's Ĥ
(``--entropy-scale estimate``): ``response_logprobs``, a list with one number per token of ``text`` (or
``logprobs`` as an OpenAI-style chat completion returns it, ``{"content": [{"logprob": ...}, ...]}``), and
``reference_logprobs``, the model's log-probabilities of the reference answer's tokens (teacher-forced).

The natural benchmark's in-the-wild files follow the paper's layout: ``llava_bench_in_the_wild_<lang>_<model>
.jsonl`` holds every question, and the ``easy`` / ``hard`` splits are lists of row positions in that file,
stored in ``lbwild_split_idx.json`` (keys ``easy_ood_fst_cd_new`` / ``hard_ood_fst_cd_new``) next to it;
``normal`` is the whole file. A per-split file ``<split>_<model>.jsonl`` is used first when it exists.

Responses are matched to dataset rows by ``question_id`` when the dataset has that column, else by row order.
Nothing is dropped silently: a malformed line, a missing field, a duplicate id, a missing or an extra
response raises :class:`ResponseFileError` naming the file (and the line where there is one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_emi import scenarios as sc
from lmms_emi._io import json_lines
from lmms_emi.errors import ResponseFileError

__all__ = [
    "WILD_INDEX_FILE",
    "WILD_INDEX_KEYS",
    "ResponseFileError",
    "ResponseRecord",
    "ResponseSource",
    "align_records",
    "align_responses",
    "find_response_source",
    "list_models",
    "load_split_responses",
    "read_response_file",
    "records_for_rows",
    "response_path",
    "responses_for_rows",
]

WILD_INDEX_FILE = "lbwild_split_idx.json"
WILD_INDEX_KEYS = {"easy": "easy_ood_fst_cd_new", "hard": "hard_ood_fst_cd_new"}


@dataclass(frozen=True)
class ResponseRecord:
    """One response: ``question_id``, response ``text``, and where it was read (file, 1-based line)."""

    question_id: int
    text: str
    path: Path
    line: int
    extra: dict[str, Any] | None = None
    response_logprobs: tuple[float, ...] | None = None
    reference_logprobs: tuple[float, ...] | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class ResponseSource:
    """Where a split's responses come from: a file and, for in-the-wild easy/hard, row positions in it."""

    split: str
    model: str
    path: Path
    positions: tuple[int, ...] | None = None  # None: every row of the file
    index_file: Path | None = None


def response_path(responses_dir: str | Path, split: str, model: str) -> Path:
    """``<responses_dir>/<split>_<model>.jsonl``."""
    return Path(responses_dir) / f"{split}_{model}.jsonl"


def read_response_file(path: str | Path) -> list[ResponseRecord]:
    """Read and validate a JSONL response file (blank lines are skipped; ids must be unique ints)."""
    path = Path(path)
    if not path.is_file():
        raise ResponseFileError(f"response file {path} does not exist")
    records: list[ResponseRecord] = []
    seen: dict[int, int] = {}
    for line_no, obj in json_lines(path, ResponseFileError):
        where = f"{path}:{line_no}"
        missing = [k for k in ("question_id", "text") if k not in obj]
        if missing:
            raise ResponseFileError(f"{where}: missing field(s) {', '.join(missing)}")
        qid = obj["question_id"]
        if isinstance(qid, str) and qid.strip().lstrip("-").isdigit():
            qid = int(qid)
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise ResponseFileError(f"{where}: question_id must be an integer, got {qid!r}")
        if not isinstance(obj["text"], str):
            raise ResponseFileError(f"{where}: text must be a string, got {type(obj['text']).__name__}")
        try:
            obj["text"].encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800"
            raise ResponseFileError(
                f"{where}: text has an unpaired surrogate {obj['text'][exc.start]!r} at position "
                f"{exc.start} (not valid Unicode)"
            ) from None
        if qid in seen:
            raise ResponseFileError(f"{where}: duplicate question_id {qid} (first on line {seen[qid]})")
        seen[qid] = line_no
        extra = {k: v for k, v in obj.items() if k not in ("question_id", "text")}
        response_lp, reference_lp = _logprobs(obj, where)
        records.append(
            ResponseRecord(qid, obj["text"], path, line_no, extra or None, response_lp, reference_lp)
        )
    if not records:
        raise ResponseFileError(f"response file {path} is empty")
    return records


def _logprob_list(value: Any, key: str, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise ResponseFileError(f"{where}: {key} must be a non-empty list of numbers")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 1e-6:
            raise ResponseFileError(
                f"{where}: {key}[{i}] = {v!r} is not a log-probability (a finite number <= 0)"
            )
    return tuple(float(v) for v in value)


def _logprobs(obj: dict[str, Any], where: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(response, reference) token log-probabilities of one line (None where absent); ``logprobs`` in the
    OpenAI chat shape stands for ``response_logprobs``."""
    response = obj.get("response_logprobs")
    if response is None and isinstance(obj.get("logprobs"), dict):
        content = obj["logprobs"].get("content")
        if not isinstance(content, list) or not all(isinstance(t, dict) and "logprob" in t for t in content):
            raise ResponseFileError(f'{where}: logprobs must hold "content": [{{"logprob": ...}}, ...]')
        response = [t["logprob"] for t in content]
    reference = obj.get("reference_logprobs")
    return (
        None if response is None else _logprob_list(response, "response_logprobs", where),
        None if reference is None else _logprob_list(reference, "reference_logprobs", where),
    )


def _read_wild_index(index_file: Path, key: str) -> tuple[int, ...]:
    if not index_file.is_file():
        raise ResponseFileError(f"{index_file} is missing: it holds the in-the-wild easy/hard split indices")
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResponseFileError(f"{index_file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or key not in data:
        raise ResponseFileError(f"{index_file} has no key {key!r}")
    positions = data[key]
    if not isinstance(positions, list) or not all(isinstance(i, int) and i >= 0 for i in positions):
        raise ResponseFileError(f"{index_file}: {key!r} must be a list of non-negative integers")
    if len(set(positions)) != len(positions):
        raise ResponseFileError(f"{index_file}: {key!r} repeats an index")
    return tuple(positions)


def find_response_source(responses_dir: str | Path, split: str, model: str) -> ResponseSource:
    """Locate the responses of ``model`` on ``split``: the per-split file, else (in-the-wild splits) the
    combined per-language file plus ``lbwild_split_idx.json``."""
    responses_dir = Path(responses_dir)
    direct = response_path(responses_dir, split, model)
    if direct.is_file():
        return ResponseSource(split, model, direct)
    scenario = sc.parse_split(split)
    if scenario is not None and scenario.wild_level is not None:
        level = scenario.wild_level
        combined = response_path(responses_dir, f"{sc.WILD}_{scenario.language}", model)
        if combined.is_file():
            if level == "normal":
                return ResponseSource(split, model, combined)
            index_file = responses_dir / WILD_INDEX_FILE
            positions = _read_wild_index(index_file, WILD_INDEX_KEYS[level])
            return ResponseSource(split, model, combined, positions, index_file)
        raise ResponseFileError(
            f"no responses of model {model!r} for {split}: neither {direct} nor {combined} exists"
        )
    raise ResponseFileError(f"no responses of model {model!r} for {split}: {direct} does not exist")


def load_split_responses(responses_dir: str | Path, split: str, model: str) -> list[ResponseRecord]:
    """The records of ``model`` on ``split`` in file order (in index-list order for in-the-wild easy/hard)."""
    source = find_response_source(responses_dir, split, model)
    records = read_response_file(source.path)
    if source.positions is None:
        return records
    bad = [i for i in source.positions if i >= len(records)]
    if bad:
        raise ResponseFileError(
            f"{source.index_file}: index {bad[0]} is out of range for {source.path} "
            f"({len(records)} responses)"
        )
    return [records[i] for i in source.positions]


def align_records(
    records: Sequence[ResponseRecord],
    *,
    question_ids: Sequence[int] | None = None,
    n_rows: int | None = None,
    what: str = "",
    allow_missing: bool = False,
) -> list[ResponseRecord | None]:
    """Response records in dataset row order.

    With ``question_ids`` (the dataset's column), each row gets the response with its id; every row must have
    one and every response must belong to a row. Without it, responses are taken in order and their count
    must equal ``n_rows``. ``what`` names the source in error messages. ``allow_missing``: a row without a
    response (by id, or past the end of the file) gets None instead of an error; extra responses are still
    an error.
    """
    label = what or (str(records[0].path) if records else "responses")
    if question_ids is None:
        if n_rows is None:
            raise ValueError("give question_ids or n_rows")
        if allow_missing and len(records) < n_rows:
            return [*records, *([None] * (n_rows - len(records)))]
        if len(records) != n_rows:
            raise ResponseFileError(
                f"{label}: {len(records)} responses but the dataset split has {n_rows} rows "
                "(no question_id column, so they are matched by row order)"
            )
        return list(records)
    ids = [int(q) for q in question_ids]
    by_id = {r.question_id: r for r in records}
    missing = [q for q in ids if q not in by_id]
    if missing and not allow_missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ResponseFileError(
            f"{label}: no response for question_id {shown} ({len(missing)} of {len(ids)} rows)"
        )
    wanted = set(ids)
    if len(wanted) != len(ids):
        raise ResponseFileError(f"{label}: the dataset split repeats a question_id")
    extra = [r for r in records if r.question_id not in wanted]
    if extra:
        raise ResponseFileError(
            f"{extra[0].where}: question_id {extra[0].question_id} is not in the dataset split "
            f"({len(extra)} extra responses; {len(records)} responses for {len(ids)} rows)"
        )
    return [by_id.get(q) for q in ids]


def align_responses(records: Sequence[ResponseRecord], **kwargs: Any) -> list[str | None]:
    """The response texts of :func:`align_records` (same arguments)."""
    return [None if r is None else r.text for r in align_records(records, **kwargs)]


def records_for_rows(
    responses_dir: str | Path,
    split: str,
    model: str,
    *,
    question_ids: Sequence[int] | None = None,
    n_rows: int | None = None,
    allow_missing: bool = False,
) -> list[ResponseRecord | None]:
    """Load ``model``'s responses on ``split``, aligned to the dataset rows (see :func:`align_records`);
    with ``allow_missing`` a missing file gives None for every row (of ``n_rows`` or ``question_ids``)."""
    try:
        source = find_response_source(responses_dir, split, model)
    except ResponseFileError:
        if not allow_missing:
            raise
        return [None] * (len(question_ids) if question_ids is not None else int(n_rows or 0))
    records = load_split_responses(responses_dir, split, model)
    what = (
        str(source.path) if source.positions is None else f"{source.path} (rows of {source.index_file.name})"
    )
    return align_records(
        records, question_ids=question_ids, n_rows=n_rows, what=what, allow_missing=allow_missing
    )


def responses_for_rows(responses_dir: str | Path, split: str, model: str, **kwargs: Any) -> list[str | None]:
    """The response texts of :func:`records_for_rows` (same arguments)."""
    return [None if r is None else r.text for r in records_for_rows(responses_dir, split, model, **kwargs)]


def list_models(responses_dir: str | Path, splits: Sequence[str]) -> list[str]:
    """Model names with responses for *every* one of ``splits`` in ``responses_dir``.

    A file's split is the longest known scenario name its stem starts with, so
    ``llava_bench_coco_frost_5_m.jsonl`` belongs to model ``m``, not ``frost_5_m``.
    """
    candidates: set[str] = set()
    for path in Path(responses_dir).glob("*.jsonl"):
        prefix = sc.split_prefix(path.stem, extra=splits)  # unknown split names (custom datasets) too
        if prefix is not None and path.stem != prefix:
            candidates.add(path.stem[len(prefix) + 1 :])
    found = []
    for model in sorted(candidates):
        try:
            for split in splits:
                find_response_source(responses_dir, split, model)
        except ResponseFileError:
            continue
        found.append(model)
    return found
