"""An OpenAI-compatible chat-completions judge that scores a model's response against the reference, as
LLaVA-Bench does: the judge sees the question, the reference (Assistant 1) and the response (Assistant 2)
and answers with two scores on its first line, reference first.

What lmms-eval ships is used where it fits: the prompt text of its LLaVA-Bench task (``rule.json`` of
``llava-in-the-wild``, same layout as ``llava_process_results``), its score parser
(``ResponseParser.parse_comparative_response``), its chat-completions payload (``build_sampling_kwargs``) and
the ``openai`` client its provider uses, with that client's own retries. Written here, because lmms-eval's
judge lacks it:

* explicit base URL / model / key (lmms-eval's provider reads only the environment) with the same
  environment fallbacks (``OPENAI_API_KEY``, ``OPENAI_API_URL`` / ``OPENAI_BASE_URL``, ``MODEL_VERSION``);
* a check before generation (:meth:`Judge.check`: ``GET /models``, else a 1-token probe) that fails as one
  :class:`~lmms_emi.errors.UsageError` line;
* a bounded number of calls per sample (the client's transport retries plus re-asking an unparsable answer),
  after which the sample is *excluded* and counted (never scored as -1, lmms-eval's llava tasks' bug);
* concurrent calls (a thread pool of ``concurrency``) and a disk cache keyed by (judge model, prompt),
  written atomically, so a rerun makes no call.

Modules: ``config`` (:class:`JudgeConfig`), ``prompt`` (prompt and parser), ``verdicts`` (:class:`Judgment`,
win rate, relative score), ``cache`` (the answer cache), ``client`` (:class:`Judge`). No torch here.
"""

from lmms_emi.judge.cache import AnswerCache
from lmms_emi.judge.client import Judge
from lmms_emi.judge.config import (
    API_KEY_ENV,
    CACHE_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    JudgeConfig,
    default_cache_dir,
)
from lmms_emi.judge.prompt import JudgeItem, build_prompt, parse_scores
from lmms_emi.judge.verdicts import JudgeStats, Judgment, relative_score, win_rate

__all__ = [
    "API_KEY_ENV",
    "CACHE_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_MODEL",
    "AnswerCache",
    "Judge",
    "JudgeConfig",
    "JudgeItem",
    "JudgeStats",
    "Judgment",
    "build_prompt",
    "default_cache_dir",
    "parse_scores",
    "relative_score",
    "win_rate",
]
