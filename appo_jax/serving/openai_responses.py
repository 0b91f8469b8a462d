"""OpenAI response bodies: chat / completion responses and stream chunks, log-probs, usage and errors.

`ResponseFormat` writes the bodies of one HTTP request (one ``id``, ``created`` time, ``model`` and
``system_fingerprint`` = the served weights' ``model_id``) for either endpoint:

* chat: ``object`` ``chat.completion`` / ``chat.completion.chunk``, ``choices[i].message`` / ``delta``, log-probs
  as ``{"content": [{token, logprob, bytes, top_logprobs: []}]}``;
* completions: ``object`` ``text_completion``, ``choices[i].text``, log-probs as ``{tokens, token_logprobs,
  text_offset, top_logprobs}`` (``top_logprobs`` holds only the chosen token: alternatives are not computed).
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> str:
    """One server-sent event: ``data: <json>`` (or a literal such as ``[DONE]``) and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@dataclasses.dataclass
class TokenLogprobs:
    """Per-token log-prob data of some generated tokens: decoded ``texts``, exact ``bytes``, ``logprobs`` and
    ``offsets`` (character offsets in the generated text; completions only)."""

    texts: list[str]
    bytes: list[list[int]]
    logprobs: list[float]
    offsets: list[int]


@dataclasses.dataclass
class Choice:
    """One finished choice of a non-streamed response."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: TokenLogprobs | None


class ResponseFormat:
    """The bodies of one response (module doc); ``chat`` selects the endpoint's format."""

    def __init__(self, chat: bool, model: str, fingerprint: str):
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def logprobs(self, lp: TokenLogprobs | None) -> dict | None:
        if lp is None:
            return None
        if self.chat:
            return {"content": [{"token": t, "logprob": v, "bytes": b, "top_logprobs": []}
                                for t, v, b in zip(lp.texts, lp.logprobs, lp.bytes)]}
        return {"tokens": lp.texts, "token_logprobs": lp.logprobs, "text_offset": lp.offsets,
                "top_logprobs": [{t: v} for t, v in zip(lp.texts, lp.logprobs)]}

    def response(self, choices: list[Choice], prompt_tokens: int) -> dict:
        """The non-streamed body with ``usage`` (completion tokens summed over the choices)."""
        out = []
        for i, c in enumerate(choices):
            body = {"index": i, "logprobs": self.logprobs(c.logprobs), "finish_reason": c.finish_reason}
            if self.chat:
                body["message"] = {"role": "assistant", "content": c.text}
            else:
                body["text"] = c.text
            out.append(body)
        return {**self._envelope(False), "choices": out,
                "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices))}

    def chunk(self, index: int, text: str, logprobs: TokenLogprobs | None = None,
              finish_reason: str | None = None, role: bool = False) -> dict:
        """One stream chunk for choice ``index`` (chat: ``role`` adds the assistant role, the first chunk)."""
        body = {"index": index, "logprobs": self.logprobs(logprobs), "finish_reason": finish_reason}
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            if text or role:
                delta["content"] = text
            body["delta"] = delta
        else:
            body["text"] = text
        return {**self._envelope(True), "choices": [body]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return {**self._envelope(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
