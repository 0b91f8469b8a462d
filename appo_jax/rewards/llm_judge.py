"""The LLM judge: a model behind an OpenAI-compatible endpoint decides whether a prediction answers a question.

The paper scores every benchmark but the four QA sets with an LLM judge (Qwen2.5-72B-Instruct served by vLLM);
any server that speaks ``POST {base_url}/chat/completions`` works: vLLM, SGLang, `appo-jax serve`, a hosted API.
One request per answer, temperature 0, the prompt :data:`JUDGE_PROMPT` (also shown in ``docs/evaluation.md``)
with the question, the reference answers and the prediction filled in.

Parsing is strict: the reply, stripped of whitespace, must be ``Correct`` or ``Incorrect`` (any case, optionally
ending with a full stop); anything else raises :class:`~appo_jax.rewards.judge.JudgeError` with the reply
attached, so a judge that rambles is counted as failed, never guessed. Transport failures (connection refused,
timeout, HTTP 429 / 5xx) are retried ``retries`` times with exponential backoff (``backoff_s * 2**attempt``);
other HTTP errors (404 unknown model, 400 bad request) fail at once with the server's message. An answer with no
``\\boxed{}`` prediction is incorrect without asking the judge.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Sequence

from appo_jax.rewards.judge import JudgeError, JudgeVerdict
from appo_jax.rewards.qa_metrics import as_ground_truths

JUDGE_PROMPT = """You are grading an answer to a question against the reference answer(s).

Question: {question}
Reference answer(s): {references}
Predicted answer: {prediction}

The prediction is correct when it means the same as one of the reference answers: the same number, entity, date \
or fact, allowing for different wording, formatting, units written out or abbreviated, and equivalent \
mathematical forms. It is incorrect when it differs in substance, is incomplete, or hedges between several answers.

Reply with exactly one word: Correct or Incorrect."""

_VERDICT = re.compile(r"^(correct|incorrect)\.?$", re.IGNORECASE)
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def parse_verdict(reply: str) -> bool:
    """True for ``Correct``, False for ``Incorrect`` (module doc); :class:`JudgeError` for anything else."""
    match = _VERDICT.match((reply or "").strip())
    if match is None:
        raise JudgeError(f"the judge's reply is not 'Correct' or 'Incorrect': {(reply or '')[:200]!r}", reply or "")
    return match.group(1).lower() == "correct"


def chat_completions_url(base_url: str) -> str:
    """``{base_url}/chat/completions`` for an OpenAI base URL (``http://host:port/v1``); a URL already ending in
    ``/chat/completions`` is kept."""
    if not re.match(r"^https?://", base_url or ""):
        raise ValueError(f"--judge-url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


class LLMJudge:
    """The judge of the module doc. ``url``: the endpoint's OpenAI base URL; ``model``: the model name it serves;
    ``api_key``: sent as a bearer token (default ``$OPENAI_API_KEY``, else none); ``timeout_s`` per request."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, retries: int = 3,
                 backoff_s: float = 1.0, timeout_s: float = 120.0, max_tokens: int = 16):
        if not model:
            raise ValueError("the LLM judge needs --judge-model (the model name the endpoint serves)")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0 or max_tokens < 1:
            raise ValueError(f"LLMJudge: retries {retries} and backoff {backoff_s} must be >= 0, timeout "
                             f"{timeout_s} and max_tokens {max_tokens} > 0")
        self.url, self.model = chat_completions_url(url), model
        self.name = f"llm:{model}"
        self.api_key = os.environ.get("OPENAI_API_KEY") if api_key is None else api_key
        self.retries, self.backoff_s, self.timeout_s, self.max_tokens = retries, backoff_s, timeout_s, max_tokens

    def prompt(self, question: str, prediction: str, ground_truths: Sequence[str]) -> str:
        refs = " | ".join(as_ground_truths(ground_truths))
        return JUDGE_PROMPT.format(question=question.strip(), references=refs, prediction=prediction.strip())

    def judge(self, question: str, prediction: str | None, ground_truths: Sequence[str]) -> JudgeVerdict:
        if prediction is None or not prediction.strip():
            return JudgeVerdict(False, 0.0, "no answer (the judge was not asked)")
        reply = self._ask(self.prompt(question, prediction, ground_truths))
        correct = parse_verdict(reply)
        return JudgeVerdict(correct, float(correct), f"{self.name} said {reply.strip()!r}", raw=reply)

    def _ask(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    text = response.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300]
                last = f"HTTP {err.code} from {self.url}: {detail}"
                if err.code not in _RETRY_STATUS:
                    raise JudgeError(last, detail) from None
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = f"{self.url} unreachable: {getattr(err, 'reason', err)}"
                continue
            return self._content(text)
        raise JudgeError(f"judge failed after {self.retries + 1} attempts: {last}")

    def _content(self, text: str) -> str:
        """The first choice's message content of a chat-completions reply; :class:`JudgeError` when the reply is
        not that shape."""
        try:
            content = json.loads(text)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url} did not return a chat completion: {text[:200]!r}", text) from None
        if not isinstance(content, str):
            raise JudgeError(f"{self.url} returned a message without text content: {text[:200]!r}", text)
        return content
