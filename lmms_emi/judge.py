"""An OpenAI-compatible chat-completions judge that scores a model's response against the reference, as
LLaVA-Bench does: the judge sees the question, the reference (Assistant 1) and the response (Assistant 2)
and answers with two scores on its first line, reference first.

What lmms-eval ships is used where it fits: the prompt text of its LLaVA-Bench task (``rule.json`` of
``llava-in-the-wild``, same layout as ``llava_process_results``), its score parser
(``ResponseParser.parse_comparative_response``), its chat-completions payload (``build_sampling_kwargs``) and
the ``openai`` client its provider uses. Written here, because lmms-eval's judge lacks it:

* explicit base URL / model / key (lmms-eval's provider reads only the environment) with the same
  environment fallbacks (``OPENAI_API_KEY``, ``OPENAI_API_URL`` / ``OPENAI_BASE_URL``, ``MODEL_VERSION``);
* a check before generation (:meth:`Judge.check`: ``GET /models``, else a 1-token probe) that fails as one
  :class:`~lmms_emi.errors.UsageError` line;
* bounded retries of 429 / 5xx / timeouts / connection errors / unparsable answers, after which the sample
  is *excluded* and counted (never scored as -1, lmms-eval's llava tasks' bug);
* concurrent calls (a thread pool of ``concurrency``) and a disk cache keyed by (judge model, prompt),
  written atomically, so a rerun makes no call.

No torch here: this module is HTTP, parsing and a cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmms_emi._io import atomic_write_text
from lmms_emi.errors import UsageError, one_line

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MODEL",
    "Judge",
    "JudgeConfig",
    "JudgeItem",
    "JudgeStats",
    "Judgment",
    "build_prompt",
    "parse_scores",
    "relative_score",
    "win_rate",
]

DEFAULT_MODEL = "gpt-4o-2024-11-20"  # lmms-eval's default judge (MODEL_VERSION of its llava tasks)
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: where ``--judge-api-key`` is handed to the processes of a run (never written into options / results)
API_KEY_ENV = "LMMS_EMI_JUDGE_API_KEY"
_CACHE_FORMAT = "lmms_emi.judge.v1"
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


def default_cache_dir() -> Path:
    """``$LMMS_EMI_JUDGE_CACHE`` or ``~/.cache/lmms_emi/judge``."""
    env = os.environ.get("LMMS_EMI_JUDGE_CACHE")
    return Path(env or "~/.cache/lmms_emi/judge").expanduser()


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how it is called. ``api_key`` is never serialised (:meth:`to_dict`)."""

    model: str = DEFAULT_MODEL
    base_url: str = DEFAULT_BASE_URL
    api_key: str = field(default="", repr=False)
    concurrency: int = 8  # judge calls in flight at once
    cache_dir: str | None = None  # None: default_cache_dir(); "off": no cache
    timeout: float = 60.0  # seconds per call
    max_attempts: int = 4  # calls per sample before it is excluded
    retry_delay: float = 1.0  # first backoff (doubles per attempt, capped at 30 s; Retry-After wins)
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise UsageError(f"--judge-concurrency must be >= 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise UsageError(f"--judge-max-attempts must be >= 1, got {self.max_attempts}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise UsageError(f"--judge-timeout must be a positive number of seconds, got {self.timeout}")

    @classmethod
    def resolve(
        cls,
        *,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        environ: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> JudgeConfig:
        """Options first, then the environment variables lmms-eval's judge tasks read: the key from
        ``$LMMS_EMI_JUDGE_API_KEY`` or ``$OPENAI_API_KEY``, the URL from ``$OPENAI_API_URL`` /
        ``$OPENAI_BASE_URL`` (a trailing ``/chat/completions`` is dropped), the model from
        ``$MODEL_VERSION``."""
        env = os.environ if environ is None else environ
        url = base_url or env.get("OPENAI_API_URL") or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        url = url.rstrip("/").removesuffix("/chat/completions")
        key = api_key or env.get(API_KEY_ENV) or env.get("OPENAI_API_KEY") or ""
        name = model or env.get("MODEL_VERSION") or DEFAULT_MODEL
        return cls(
            model=name, base_url=url, api_key=key, **{k: v for k, v in kwargs.items() if v is not None}
        )

    def cache_path(self) -> Path | None:
        if self.cache_dir is not None and self.cache_dir.lower() in ("off", "none", "false"):
            return None
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("api_key")
        return out


# ------------------------------------------------------------------------------------------ prompt, parse
def _rule() -> dict[str, str]:
    """The LLaVA-Bench judge rule of lmms-eval's ``llava-in-the-wild`` task (read from its package data)."""
    import importlib.util

    spec = importlib.util.find_spec("lmms_eval")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "tasks" / "llava-in-the-wild" / "rule.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))[_RULE]
    return _FALLBACK_RULE


_RULE_CACHE: dict[str, str] | None = None


def build_prompt(question: str, reference: str, response: str, context: str | None = None) -> str:
    """The LLaVA-Bench judge prompt (lmms-eval's ``llava_process_results`` layout): context (when given),
    question, the reference as Assistant 1, the response as Assistant 2, then the rule."""
    global _RULE_CACHE
    if _RULE_CACHE is None:
        _RULE_CACHE = _rule()
    role, rule = _RULE_CACHE["role"], _RULE_CACHE["prompt"]
    head = f"[Context]\n{context}\n\n" if context else ""
    return (
        f"{head}[Question]\n{question}\n\n[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
        f"[{role} 2]\n{response}\n\n[End of {role} 2]\n\n[System]\n{rule}\n\n"
    )


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """(reference score, response score) from the judge's first line with lmms-eval's parser; None when the
    answer has no two finite, non-negative numbers there (lmms-eval would score it -1)."""
    if not text:
        return None
    from lmms_eval.llm_judge.utils import ResponseParser

    ref, model = ResponseParser.parse_comparative_response(text)
    if not (math.isfinite(ref) and math.isfinite(model)) or ref < 0 or model < 0:
        return None
    return float(ref), float(model)


# ------------------------------------------------------------------------------------------ results
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


@dataclass(frozen=True)
class Judgment:
    """The judge's verdict on one sample: both scores, or ``error`` (then the sample is excluded)."""

    task: str
    doc_id: int | str
    ref_score: float | None = None
    model_score: float | None = None
    error: str | None = None
    attempts: int = 0  # calls made for it in this run (0: from the cache or a log)
    cached: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    source: str = "judge"  # "judge" (this run or the cache) or "log" (a run's lmms-eval judge scores)

    @property
    def scored(self) -> bool:
        return self.error is None and self.ref_score is not None and self.model_score is not None

    @property
    def win(self) -> bool | None:
        """1[r(ŷ) > r(y)] (paper Eq. 2: a tie is not a win); None when excluded."""
        return None if not self.scored else bool(self.model_score > self.ref_score)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def win_rate(judgments: Sequence[Judgment]) -> float | None:
    """WR = mean over the scored samples of 1[r(x, ŷ) > r(x, y)] (paper Eq. 2); None when none is scored."""
    wins = [j.win for j in judgments if j.scored]
    return sum(wins) / len(wins) if wins else None


def relative_score(judgments: Sequence[Judgment]) -> float | None:
    """mean response score / mean reference score × 100 over the scored samples (lmms-eval's llava-bench
    aggregate); None when none is scored or the reference mean is 0."""
    rows = [j for j in judgments if j.scored]
    if not rows:
        return None
    ref = sum(j.ref_score for j in rows) / len(rows)
    model = sum(j.model_score for j in rows) / len(rows)
    return 100.0 * model / ref if ref > 0 else None


@dataclass
class JudgeStats:
    """What a judging pass cost: calls, retries, cache hits, exclusions, tokens, wall time."""

    calls: int = 0
    retries: int = 0
    cache_hits: int = 0
    excluded: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: int = 0  # calls whose answer carried token usage
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ the client
class _Retryable(Exception):
    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


class Judge:
    """The judge client: :meth:`check` before generation, :meth:`judge` on a run's samples (thread-safe)."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.stats = JudgeStats()
        self._lock = threading.Lock()
        self._client: Any = None
        self._cache = config.cache_path()

    # -- transport ----------------------------------------------------------------------------------
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from openai import OpenAI

                self._client = OpenAI(
                    api_key=self.config.api_key or "none",
                    base_url=self.config.base_url,
                    timeout=self.config.timeout,
                    max_retries=0,  # retries are ours (bounded, counted)
                )
            return self._client

    def _payload(self, prompt: str, max_tokens: int | None = None) -> dict[str, Any]:
        from lmms_eval.llm_judge.protocol import ServerConfig
        from lmms_eval.llm_judge.providers.openai import build_sampling_kwargs

        config = ServerConfig(model_name=self.config.model, max_tokens=max_tokens or self.config.max_tokens)
        messages = [{"role": "user", "content": prompt}]
        return {"model": self.config.model, "messages": messages, **build_sampling_kwargs(config)}

    def _call(self, prompt: str) -> tuple[str, dict[str, int] | None]:
        """One chat-completions call: (answer text, usage). Raises :class:`_Retryable` for what a retry may
        fix and ``UsageError`` for what it cannot (bad key, unknown model, bad request)."""
        import openai

        try:
            reply = self.client().chat.completions.create(**self._payload(prompt))
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise _Retryable(f"{type(exc).__name__}") from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status == 429 or status >= 500 or status == 408:
                raise _Retryable(f"HTTP {status}", _retry_after(exc)) from None
            raise UsageError(self._status_message(status, exc)) from None
        try:
            text = reply.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise _Retryable("an answer without choices") from None
        usage = getattr(reply, "usage", None)
        counts = None
        if usage is not None and getattr(usage, "prompt_tokens", None) is not None:
            counts = {
                "prompt_tokens": int(usage.prompt_tokens or 0),
                "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
            }
        return text or "", counts

    def _status_message(self, status: int, exc: Exception) -> str:
        where = f"judge {self.config.model!r} at {self.config.base_url}"
        detail = one_line(exc)[:200]
        if status in (401, 403):
            return f"{where}: the API key was refused (HTTP {status}); set --judge-api-key or $OPENAI_API_KEY"
        if status == 404:
            return (
                f"{where}: not found (HTTP 404: {detail}); check --judge-model and --judge-base-url "
                "(the URL up to /v1)"
            )
        return f"{where}: request rejected (HTTP {status}: {detail})"

    # -- check before generation --------------------------------------------------------------------
    def check(self) -> None:
        """Fail now, as one ``UsageError`` line, when the judge cannot work: no key, an unreachable URL, a
        refused key or an unknown model (``GET /models``; a 1-token probe where the endpoint has no model
        list)."""
        import openai

        where = f"judge {self.config.model!r} at {self.config.base_url}"
        if not self.config.api_key:
            raise UsageError(
                f"{where}: no API key; set --judge-api-key or $OPENAI_API_KEY (any non-empty value for a "
                "local server)"
            )
        if not self.config.base_url.startswith(("http://", "https://")):
            raise UsageError(f"--judge-base-url {self.config.base_url!r}: not an http(s) URL")
        client = self.client()
        try:
            models = [m.id for m in client.models.list()]
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise UsageError(
                f"{where}: not reachable ({type(exc).__name__}); check --judge-base-url and the network"
            ) from None
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise UsageError(self._status_message(exc.status_code, exc)) from None
            models = None  # no model list here: probe the model itself
        if models is not None:
            if self.config.model not in models:
                shown = ", ".join(sorted(models)[:5]) or "none"
                raise UsageError(
                    f"{where}: unknown model (the endpoint lists {len(models)}: {shown}); set --judge-model"
                )
            return
        try:
            client.chat.completions.create(**self._payload("Reply with 1.", max_tokens=1))
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise UsageError(f"{where}: not reachable ({type(exc).__name__})") from None
        except openai.APIStatusError as exc:
            if exc.status_code not in (429,) and exc.status_code < 500:
                raise UsageError(self._status_message(exc.status_code, exc)) from None

    # -- judging ------------------------------------------------------------------------------------
    def _cache_file(self, prompt: str) -> Path | None:
        if self._cache is None:
            return None
        key = hashlib.sha256(f"{self.config.model}\0{prompt}".encode()).hexdigest()
        return self._cache / key[:2] / f"{key}.json"

    def _cached(self, path: Path | None) -> tuple[float, float] | None:
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a damaged entry is judged again
        if data.get("format") != _CACHE_FORMAT or data.get("model") != self.config.model:
            return None
        return parse_scores(data.get("answer"))

    def judge_one(self, item: JudgeItem) -> Judgment:
        """Scores of one sample: from the cache, else up to ``max_attempts`` calls; an exhausted sample is
        excluded with the last reason."""
        prompt = item.prompt
        path = self._cache_file(prompt)
        hit = self._cached(path)
        if hit is not None:
            with self._lock:
                self.stats.cache_hits += 1
            return Judgment(item.task, item.doc_id, hit[0], hit[1], cached=True)
        reason, attempt = "not called", 0
        tokens: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0}
        reported = False
        for attempt in range(1, self.config.max_attempts + 1):
            wait: float | None = None
            try:
                with self._lock:
                    self.stats.calls += 1
                    self.stats.retries += attempt > 1
                text, usage = self._call(prompt)
                if usage is not None:
                    reported = True
                    for k in tokens:
                        tokens[k] += usage[k]
                    with self._lock:
                        self.stats.usage_reported += 1
                        self.stats.prompt_tokens += usage["prompt_tokens"]
                        self.stats.completion_tokens += usage["completion_tokens"]
                scores = parse_scores(text)
                if scores is None:
                    raise _Retryable(f"unparsable answer {text[:60]!r}")
                if path is not None:
                    record = {"format": _CACHE_FORMAT, "model": self.config.model, "answer": text}
                    atomic_write_text(path, json.dumps(record, ensure_ascii=False))
                return Judgment(
                    item.task,
                    item.doc_id,
                    scores[0],
                    scores[1],
                    attempts=attempt,
                    prompt_tokens=tokens["prompt_tokens"] if reported else None,
                    completion_tokens=tokens["completion_tokens"] if reported else None,
                )
            except _Retryable as exc:
                reason, wait = str(exc), exc.wait
            except UsageError as exc:  # a refused key / unknown model mid-run: no retry can fix it
                reason = str(exc)
                break
            except Exception as exc:  # anything else the transport raises: retried, then excluded
                reason = f"{type(exc).__name__}: {one_line(exc)[:120]}"
            if attempt < self.config.max_attempts:
                backoff = min(self.config.retry_delay * 2 ** (attempt - 1), 30.0)
                time.sleep(backoff if wait is None else min(wait, 60.0))
        with self._lock:
            self.stats.excluded += 1
        return Judgment(
            item.task,
            item.doc_id,
            error=f"{reason} (attempt {attempt} of {self.config.max_attempts})",
            attempts=attempt,
            prompt_tokens=tokens["prompt_tokens"] if reported else None,
            completion_tokens=tokens["completion_tokens"] if reported else None,
        )

    def judge(self, items: Sequence[JudgeItem], *, progress: bool = False) -> list[Judgment]:
        """Judge ``items`` with up to ``concurrency`` calls in flight; results in the order of ``items``
        (a sample the judge could not score is in them, excluded, with its reason)."""
        from tqdm.auto import tqdm

        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
                futures = [pool.submit(self.judge_one, item) for item in items]
                out = []
                for future in tqdm(futures, desc="judge", disable=not progress, leave=False):
                    out.append(future.result())
        finally:
            self.stats.wall_seconds += time.perf_counter() - started
        return out


def _retry_after(exc: Any) -> float | None:
    """The server's ``Retry-After`` seconds, when it sent one."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        value = headers.get("retry-after")
        return None if value is None else max(0.0, float(value))
    except (TypeError, ValueError):
        return None
