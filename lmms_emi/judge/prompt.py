"""What the judge is asked and how its answer is read: lmms-eval's LLaVA-Bench judge prompt (``rule.json`` of
its ``llava-in-the-wild`` task, ``llava_process_results`` layout) and its score parser
(``ResponseParser.parse_comparative_response``)."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

__all__ = ["JudgeItem", "build_prompt", "parse_scores"]

_RULE = "default"  # rule.json entry: the records carry no image captions for the llava_bench_* rules
_FALLBACK_RULE = {  # rule.json's "default" entry, used when lmms-eval's task folder is not installed
    "role": "Assistant",
    "prompt": "We would like to request your feedback on the performance of two AI assistants in response "
    "to the user question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of "
    "details of their responses. Each assistant receives an overall score on a scale of 1 to 10, where a "
    "higher score indicates better overall performance.\nPlease first output a single line containing only "
    "two values indicating the scores for Assistant 1 and 2, respectively. The two scores are separated by "
    "a space.\nIn the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias and ensuring that the order in which the responses were presented does "
    "not affect your judgment.",
}


@functools.cache
def _rule() -> dict[str, str]:
    """The LLaVA-Bench judge rule of lmms-eval's ``llava-in-the-wild`` task (read from its package data)."""
    from lmms_emi.lmms_eval_compat import judge_rule_file

    path = judge_rule_file()
    return _FALLBACK_RULE if path is None else json.loads(path.read_text(encoding="utf-8"))[_RULE]


def build_prompt(question: str, reference: str, response: str, context: str | None = None) -> str:
    """The LLaVA-Bench judge prompt (lmms-eval's ``llava_process_results`` layout): context (when given),
    question, the reference as Assistant 1, the response as Assistant 2, then the rule."""
    rule = _rule()
    role, text = rule["role"], rule["prompt"]
    head = f"[Context]\n{context}\n\n" if context else ""
    return (
        f"{head}[Question]\n{question}\n\n[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{response}\n\n[End of {role} 2]\n\n[System]\n{text}\n\n"
    )


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """(reference score, response score) from the judge's first line with lmms-eval's parser; None when the
    answer has no two finite, non-negative numbers there (lmms-eval would score it -1)."""
    if not text:
        return None
    from lmms_emi.lmms_eval_compat import parse_comparative_scores

    ref, model = parse_comparative_scores(text)
    if not (math.isfinite(ref) and math.isfinite(model)) or ref < 0 or model < 0:
        return None
    return float(ref), float(model)


@dataclass(frozen=True)
class JudgeItem:
    """One sample to judge."""

    task: str
    doc_id: int | str
    question: str
    reference: str
    response: str

    @property
    def prompt(self) -> str:
        return build_prompt(self.question, self.reference, self.response)
