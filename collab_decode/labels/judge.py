"""The `judge` verifier: a chat model behind any OpenAI-compatible endpoint (collab-decode itself, vLLM, ...)
is asked whether two continuations of the same context differ in meaning or reasoning.

    (context, reference step, branch step) -> judge_prompt(template) -> POST {url}/chat/completions
    (`judge_concurrency` requests in flight, greedy) -> parse_judge_reply -> neutral | divergent | unparsed

A reply that names no verdict, or a request the endpoint refuses as bad (HTTP 400/413/422: e.g. too long for
its context), is labelled `unparsed`, never a crash. A server that is down or failing (connection errors,
HTTP 5xx, after retries) or that refuses us (401/403/404) stops the stage: rerun to resume.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from collab_decode.labels.continuations import Branch
from collab_decode.labels.traces import Trace
from collab_decode.labels.verifiers import Verdict, Verifier

DEFAULT_TEMPLATE = """Two continuations of the same partial answer follow. Decide whether they differ in meaning or \
in reasoning, or only in wording.

Partial answer so far:
{context}

Continuation A:
{reference}

Continuation B:
{candidate}

Reply with one word: SAME if A and B say the same thing and reason the same way (wording may differ), \
DIFFERENT if they differ in meaning, in a number, or in the reasoning step they take.
Verdict:"""

PLACEHOLDERS = ("{context}", "{reference}", "{candidate}")
NEUTRAL_WORDS = ("same", "neutral", "equivalent")
DIVERGENT_WORDS = ("different", "divergent")
REFUSED_AS_BAD = (400, 413, 422)  # the endpoint judged this one request malformed or too long
RETRIES = 3
_VERDICT = re.compile(r"verdict\s*[:=-]\s*\W*([a-z]+)", re.IGNORECASE)
_FIRST_WORD = re.compile(r"[a-z]+", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge endpoint is down, failing or refusing us: the stage stops (rerun to resume)."""


def load_template(path: str | None) -> str:
    """The template in `path` (or the default); it must use {reference} and {candidate}."""
    if path is None:
        return DEFAULT_TEMPLATE
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read the judge template {path}: {e}") from None
    missing = [p for p in PLACEHOLDERS[1:] if p not in text]
    if missing:
        raise ValueError(f"judge template {path} lacks {' and '.join(missing)}")
    return text


def judge_prompt(template: str, context: str, reference: str, candidate: str) -> str:
    """The template with its placeholders filled (plain replacement: other braces in the template stay)."""
    for name, value in zip(PLACEHOLDERS, (context, reference, candidate)):
        template = template.replace(name, value)
    return template


def parse_judge_reply(reply: str | None) -> str:
    """neutral | divergent | unparsed. The word after the last "Verdict:" if there is one, else the reply's
    first word (thinking blocks dropped); SAME/NEUTRAL/EQUIVALENT -> neutral, DIFFERENT/DIVERGENT ->
    divergent; anything else -> unparsed."""
    if not isinstance(reply, str):
        return "unparsed"
    text = re.sub(r"<think>.*?(</think>|$)", " ", reply, flags=re.DOTALL | re.IGNORECASE)
    verdicts = _VERDICT.findall(text)
    word = verdicts[-1] if verdicts else next(iter(_FIRST_WORD.findall(text)), "")
    word = word.lower()
    if word in NEUTRAL_WORDS:
        return "neutral"
    if word in DIVERGENT_WORDS:
        return "divergent"
    return "unparsed"


class JudgeClient:
    """Chat completions from one endpoint, several in flight; replies in request order."""

    def __init__(self, url: str, model: str, max_tokens: int, concurrency: int, api_key: str | None = None,
                 timeout_s: float = 120.0):
        try:
            import httpx
        except ImportError:
            raise ValueError("the judge verifier needs httpx: pip install httpx") from None

        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.max_tokens, self.concurrency = model, max_tokens, concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout_s)

    def ask_all(self, prompts: list[str]) -> list[tuple[str | None, str | None]]:
        """(reply text, None) or (None, why the endpoint refused this request), per prompt. The first
        JudgeError cancels the requests not yet sent and is raised."""
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            return [f.result() for f in [pool.submit(self.ask, p) for p in prompts]]
        finally:
            pool.shutdown(cancel_futures=True)

    def ask(self, prompt: str) -> tuple[str | None, str | None]:
        import httpx

        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": self.max_tokens}
        for attempt in range(RETRIES):
            try:
                r = self.http.post(self.url, json=body)
            except httpx.TransportError as e:
                error = f"cannot reach the judge at {self.url}: {e}"
            else:
                if r.status_code in REFUSED_AS_BAD:
                    return None, f"HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code == 200:
                    return _reply_text(r), None
                error = f"the judge at {self.url} answered HTTP {r.status_code}: {r.text[:300]}"
                if r.status_code < 500:
                    break  # 401/403/404...: retrying will not help
            time.sleep(0.5 * 2 ** attempt)
        raise JudgeError(error)

    def close(self) -> None:
        self.http.close()


def _reply_text(response) -> str | None:
    """The first choice's message content, or None if the body is not a chat completion."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


class JudgeVerifier(Verifier):
    def __init__(self, tokenizer, settings, queries, api_key: str | None = None):
        super().__init__(tokenizer, settings, queries)
        self.template = load_template(settings.judge_template)
        self.client = JudgeClient(settings.judge_url, settings.judge_model, settings.judge_max_tokens,
                                  settings.judge_concurrency, api_key)

    @property
    def stop(self) -> tuple[str, ...]:
        return (self.settings.step_delimiter,)

    def label(self, items: list[tuple[Branch, Trace]]) -> list[Verdict]:
        prompts = []
        for branch, trace in items:
            context = self.decode(trace.prompt_ids + trace.response_ids[:branch.position])
            prompts.append(judge_prompt(self.template, context, *self.steps(branch, trace)))
        verdicts = []
        for reply, error in self.client.ask_all(prompts):
            detail = {"reply": reply} if error is None else {"error": error}
            verdicts.append(Verdict(parse_judge_reply(reply), detail))
        return verdicts
