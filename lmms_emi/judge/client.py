"""The judge client (:class:`Judge`): a check before generation, then concurrent calls through the ``openai``
client, the answer cache first.

Retries are split by what can fix the failure. The ``openai`` client retries the transport itself
(``max_retries``: timeouts, connection errors, HTTP 408 / 409 / 429 / 5xx, exponential backoff with jitter,
the server's ``Retry-After`` honoured); the judge asks again only when an answer does not parse into two
scores. Both draw on one budget, ``max_attempts`` calls per sample; a sample that exhausts it is *excluded*
and counted, never scored (lmms-eval's llava tasks score it -1). A refused key or an unknown model is not
retried.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lmms_emi.errors import UsageError, one_line
from lmms_emi.judge.cache import AnswerCache
from lmms_emi.judge.config import JudgeConfig
from lmms_emi.judge.prompt import JudgeItem, parse_scores
from lmms_emi.judge.verdicts import JudgeStats, Judgment

__all__ = ["Judge"]


class _GaveUp(Exception):
    """The ``openai`` client's own retries of a transport failure are spent."""


class Judge:
    """The judge client: :meth:`check` before generation, :meth:`judge` on a run's samples (thread-safe)."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.stats = JudgeStats()
        self._lock = threading.Lock()
        self._clients: dict[int, Any] = {}  # max_retries -> openai client (one HTTP connection pool)
        self._sent = threading.local()  # HTTP requests sent by this thread (the client's retries included)
        root = config.cache_path()
        self._cache = None if root is None else AnswerCache(root, config.model)

    # -- transport ----------------------------------------------------------------------------------
    def _count_request(self, request: Any) -> None:
        self._sent.n = getattr(self._sent, "n", 0) + 1

    def _requests_sent(self) -> int:
        return getattr(self._sent, "n", 0)

    def client(self, max_retries: int | None = None) -> Any:
        """The ``openai`` client (``max_retries`` default: ``max_attempts`` - 1)."""
        retries = self.config.max_attempts - 1 if max_retries is None else max_retries
        with self._lock:
            if not self._clients:
                import openai

                http = openai.DefaultHttpxClient(event_hooks={"request": [self._count_request]})
                self._clients[retries] = openai.OpenAI(
                    api_key=self.config.api_key or "none",
                    base_url=self.config.base_url,
                    timeout=self.config.timeout,
                    max_retries=retries,
                    http_client=http,
                )
            elif retries not in self._clients:
                self._clients[retries] = next(iter(self._clients.values())).with_options(max_retries=retries)
            return self._clients[retries]

    def _payload(self, prompt: str, max_tokens: int | None = None) -> dict[str, Any]:
        from lmms_emi.lmms_eval_compat import judge_sampling_kwargs

        sampling = judge_sampling_kwargs(self.config.model, max_tokens or self.config.max_tokens)
        messages = [{"role": "user", "content": prompt}]
        return {"model": self.config.model, "messages": messages, **sampling}

    def _call(self, prompt: str, max_retries: int) -> tuple[str, dict[str, int] | None]:
        """One chat completion, the client retrying the transport up to ``max_retries`` times: (answer text,
        usage). Raises :class:`_GaveUp` when those retries are spent and ``UsageError`` for what no retry
        fixes (bad key, unknown model, bad request)."""
        import openai

        try:
            reply = self.client(max_retries).chat.completions.create(**self._payload(prompt))
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise _GaveUp(type(exc).__name__) from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status in (408, 409, 429) or status >= 500:
                raise _GaveUp(f"HTTP {status}") from None
            raise UsageError(self._status_message(status, exc)) from None
        try:
            text = reply.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            text = None  # an answer without choices: no scores in it
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
        list). Nothing is retried here."""
        import openai

        where = f"judge {self.config.model!r} at {self.config.base_url}"
        if not self.config.api_key:
            raise UsageError(
                f"{where}: no API key; set --judge-api-key or $OPENAI_API_KEY (any non-empty value for a "
                "local server)"
            )
        if not self.config.base_url.startswith(("http://", "https://")):
            raise UsageError(f"--judge-base-url {self.config.base_url!r}: not an http(s) URL")
        client = self.client(max_retries=0)
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
    def judge_one(self, item: JudgeItem) -> Judgment:
        """Scores of one sample: from the cache, else from up to ``max_attempts`` calls (the client's
        transport retries and the judge's re-asks of unparsable answers together); a sample that exhausts
        them is excluded with the last reason."""
        prompt = item.prompt
        hit = parse_scores(self._cache.get(prompt)) if self._cache is not None else None
        if hit is not None:
            with self._lock:
                self.stats.cache_hits += 1
            return Judgment(item.task, item.doc_id, hit[0], hit[1], cached=True)
        budget = self.config.max_attempts
        used, reason, scores = 0, "not called", None
        tokens = {"prompt_tokens": 0, "completion_tokens": 0}
        reported = False
        while used < budget and scores is None:
            before = self._requests_sent()
            text, usage, stop = "", None, False
            try:
                text, usage = self._call(prompt, max_retries=budget - used - 1)
            except _GaveUp as exc:  # the client's retries are spent: so is the budget
                reason, stop = str(exc), True
            except UsageError as exc:  # a refused key / unknown model mid-run: no retry can fix it
                reason, stop = str(exc), True
            except Exception as exc:  # anything else (a malformed reply body): asked again
                reason = f"{type(exc).__name__}: {one_line(exc)[:120]}"
            else:
                scores = parse_scores(text)
                if scores is None:
                    reason = f"unparsable answer {text[:60]!r}"
            sent = max(self._requests_sent() - before, 1)
            with self._lock:
                self.stats.calls += sent
                self.stats.retries += sent - (used == 0)
                if usage is not None:
                    self.stats.usage_reported += 1
                    self.stats.prompt_tokens += usage["prompt_tokens"]
                    self.stats.completion_tokens += usage["completion_tokens"]
            used += sent
            if usage is not None:
                reported = True
                for k in tokens:
                    tokens[k] += usage[k]
            if stop:
                break
        counts = {k: (v if reported else None) for k, v in tokens.items()}
        if scores is not None:
            if self._cache is not None:
                self._cache.put(prompt, text)
            return Judgment(item.task, item.doc_id, scores[0], scores[1], attempts=used, **counts)
        with self._lock:
            self.stats.excluded += 1
        return Judgment(
            item.task, item.doc_id, error=f"{reason} (attempt {used} of {budget})", attempts=used, **counts
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
