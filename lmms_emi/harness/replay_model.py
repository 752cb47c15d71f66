"""``emi_replay``: an lmms-eval model that answers from saved response files instead of generating.

``--model emi_replay --model_args responses=DIR,model_name=llava-v1.5-13b`` answers each request of task T on
document ``doc_id`` with the line of ``DIR/<split>_<model_name>.jsonl`` (``question_id`` + ``text``, the
paper's format; in-the-wild easy / hard through ``lbwild_split_idx.json``) that belongs to that document, so
existing outputs can be scored through the real harness. Plugin tasks map to their scenario split; any other
task T reads ``DIR/<T>_<model_name>.jsonl``. Documents are matched by ``question_id`` when the split has that
column, else by row order. A missing file or response is an error naming the task and document; with
``strict=false`` only the rows that truly have no saved response are answered with ``fallback`` (default
``""``), counted in ``missing_rows`` and named in one warning per task (a malformed file is still an error).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lmms_emi import lmms_eval_compat as compat
from lmms_emi import scenarios as sc
from lmms_emi.errors import ReplayError
from lmms_emi.harness import session
from lmms_emi.sources.responses import responses_for_rows

__all__ = ["ReplayError", "ReplayModel"]

lmms, Instance = compat.model_api()


class ReplayModel(lmms):
    """Replays saved responses (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        responses: str | None = None,
        model_name: str | None = None,
        strict: bool | str = True,
        fallback: str = "",
        device: str | None = None,
        batch_size: int | str | None = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not responses:
            raise ReplayError("emi_replay needs --model_args responses=DIR,model_name=NAME")
        self.responses_dir = Path(responses).expanduser()
        if not self.responses_dir.is_dir():
            raise ReplayError(f"emi_replay: responses folder {self.responses_dir} does not exist")
        self.model_name = model_name or self._guess_model_name()
        self.strict = str(strict).lower() not in ("0", "false", "no", "off")
        self.fallback = fallback
        self._device = device or self._default_device()
        self._answers: dict[tuple[str, str], list[str | None]] = {}
        self.missing_rows: dict[str, int] = {}  # task -> rows answered with the fallback (strict=false)
        self._filled_note = (  # in the task's warnings (results JSON, reports) through the run session
            f"no saved response in {self.responses_dir} (model {self.model_name}), answered with "
            f"{self.fallback!r} by emi_replay (strict=false)"
        )

    @property
    def device(self) -> str:
        return self._device

    @staticmethod
    def _default_device() -> str:
        """Device of lmms-eval's rank bookkeeping tensors: this rank's GPU (NCCL needs CUDA), else CPU."""
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cpu"

    def _guess_model_name(self) -> str:
        """The model of the response files when the folder holds exactly one."""
        names = set()
        for path in self.responses_dir.glob("*.jsonl"):
            split = sc.split_prefix(path.stem)
            if split is not None and path.stem != split:
                names.add(path.stem[len(split) + 1 :])
        if len(names) != 1:
            found = ", ".join(sorted(names)) or "none"
            raise ReplayError(
                f"emi_replay: say which model's responses to replay with model_name=NAME (found: {found})"
            )
        return names.pop()

    # -------------------------------------------------------------------------------------------------
    def _split_answers(self, task: str, split: str) -> list[str | None]:
        """Responses aligned to the rows of ``task``'s split (loaded once per task); None for a row without
        one (only with ``strict=false``, announced by one warning)."""
        key = (task, split)
        if key not in self._answers:
            scenario = sc.scenario_for_task(task)
            file_split = scenario.split if scenario is not None else task
            dataset = self.task_dict[task][split]
            ids = None
            if "question_id" in dataset.column_names:
                ids = [int(q) for q in dataset.select_columns(["question_id"])["question_id"]]
            try:
                answers = responses_for_rows(
                    self.responses_dir,
                    file_split,
                    self.model_name,
                    question_ids=ids,
                    n_rows=len(dataset),
                    allow_missing=not self.strict,
                )
            except ValueError as exc:
                raise ReplayError(f"emi_replay: task {task}: {exc}") from None
            missing = [i for i, a in enumerate(answers) if a is None]
            if missing:
                named = ids if ids is not None else list(range(len(answers)))
                shown = ", ".join(str(named[i]) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
                what = "question_id" if ids is not None else "row"
                print(
                    f"emi_replay: warning: task {task}: {len(missing)} of {len(answers)} rows have no saved "
                    f"response ({what} {shown}); answered with {self.fallback!r} (strict=false)",
                    file=sys.stderr,
                )
            self._answers[key] = answers
        return self._answers[key]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for req in requests:
            _ctx, _gen_kwargs, _doc_to_visual, doc_id, task, split = req.args[:6]
            answers = self._split_answers(task, split)  # a file error is raised even with strict=false
            answer = answers[doc_id] if 0 <= doc_id < len(answers) else None
            if answer is None:
                if self.strict:
                    raise ReplayError(f"emi_replay: no saved response for task {task}, doc {doc_id}")
                self.missing_rows[task] = self.missing_rows.get(task, 0) + 1
                answer = self.fallback
                session.current().mark_filled(task, doc_id, self._filled_note)
            out.append(answer)
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("emi_replay only replays generations (generate_until tasks)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("emi_replay only replays single-turn generations")
