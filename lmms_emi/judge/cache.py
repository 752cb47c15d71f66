"""The judge's answer cache: one JSON file per (judge model, prompt), written atomically, so a rerun asks
only for what was not answered before. Only answers that parse into two scores are stored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmms_emi._io import atomic_write_text

__all__ = ["AnswerCache"]

_FORMAT = "lmms_emi.judge.v1"


class AnswerCache:
    """``<root>/<key[:2]>/<key>.json``, key = sha256(model NUL prompt), holding the judge's answer text."""

    def __init__(self, root: Path, model: str) -> None:
        self.root, self.model = Path(root), model

    def _file(self, prompt: str) -> Path:
        key = hashlib.sha256(f"{self.model}\0{prompt}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.json"

    def get(self, prompt: str) -> str | None:
        """The stored answer to ``prompt``; None when there is none (a damaged entry is none)."""
        path = self._file(prompt)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("format") != _FORMAT or data.get("model") != self.model:
            return None
        answer = data.get("answer")
        return answer if isinstance(answer, str) else None

    def put(self, prompt: str, answer: str) -> None:
        record = {"format": _FORMAT, "model": self.model, "answer": answer}
        atomic_write_text(self._file(prompt), json.dumps(record, ensure_ascii=False))
