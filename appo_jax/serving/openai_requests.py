"""OpenAI request bodies -> `GenerationSpec`: every field checked, every refusal a `RequestError` naming the field.

Honoured: ``model`` (must be the served name; absent = the served model), ``messages`` (chat) / ``prompt``
(completions: a string, a list of one string, or a list of token ids), ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature`` (>= 0, 0 = greedy), ``top_p`` (in (0, 1]), ``stop`` (a string or a list
of up to 4 non-empty strings), ``seed``, ``n``, ``stream`` with ``stream_options.include_usage``, ``logprobs``
(chat: ``true`` with ``top_logprobs`` 0 / absent; completions: 0). Fields this server cannot honour are refused
when set to anything but their no-op value (penalties, ``logit_bias``, tools, ``response_format`` other than text,
``echo``, ``suffix``, ``best_of`` > 1, top alternatives in log-probs); unknown fields are ignored.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from appo_jax.rollout.sampling import SamplingParams

MAX_STOP_STRINGS = 4
MAX_CHOICES = 64
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class RequestError(Exception):
    """A refused request: HTTP ``status``, a ``message`` naming the field (``param``), an OpenAI error ``type``
    and ``code``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


@dataclasses.dataclass
class GenerationSpec:
    """A validated request: the prompt's token ids and how to generate (``n`` choices)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    seed: int | None
    n: int
    logprobs: bool
    stream: bool
    include_usage: bool


@dataclasses.dataclass
class ServedModel:
    """What requests are checked against: the served ``name``, ``context_len`` (prompt + generated tokens),
    ``vocab_size`` and the two prompt encoders (chat messages -> ids, text -> ids)."""

    name: str
    context_len: int
    vocab_size: int
    encode_chat: Callable[[list[dict]], list[int]]
    encode_text: Callable[[str], list[int]]


# ------------------------------------------------------------------------------------------------ field readers
def _integer(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", name)
    if lo is not None and value < lo:
        raise RequestError(f"{name} must be >= {lo}, got {value}", name)
    if hi is not None and value > hi:
        raise RequestError(f"{name} must be <= {hi}, got {value}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of non-empty strings, got {value!r}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop holds at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return tuple(dict.fromkeys(stops))


def _refuse_unsupported(body: dict, names: Sequence[str]) -> None:
    """Refuse the fields this server cannot honour unless they hold their no-op value."""
    noop = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "echo": (False,),
            "suffix": ("",), "best_of": (1,), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
            "function_call": ("none",), "response_format": ({"type": "text"},)}
    for name in names:
        value = body.get(name)
        if value is not None and value not in noop[name]:
            raise RequestError(f"{name}={value!r} is not supported by this server (docs/serving.md lists what is "
                               "honoured)", name)


# ------------------------------------------------------------------------------------------------ common fields
def check_model(body: dict, model: ServedModel) -> None:
    name = body.get("model")
    if name is not None and name != model.name:
        raise RequestError(f"model {name!r} does not exist; this server serves {model.name!r} (GET /v1/models)",
                           "model", status=404, code="model_not_found")


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0 (0 = greedy), got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    # greedy ignores top_p: one compiled decode program for every greedy request
    return SamplingParams(0.0) if temperature == 0 else SamplingParams(temperature, top_p, 0)


def _max_tokens(value: int | None, param: str, prompt_param: str, prompt_len: int, model: ServedModel,
                default: int | None) -> int:
    """The generation budget: ``value`` of field ``param`` (None: ``default``, capped by the room left in the
    context; no default: all of that room)."""
    if prompt_len >= model.context_len:
        raise RequestError(f"the prompt has {prompt_len} tokens but the context is {model.context_len} tokens "
                           f"(a prompt may have at most {model.context_len - 1}, leaving room for one generated "
                           "token)", prompt_param, code="context_length_exceeded")
    room = model.context_len - prompt_len
    if value is None:
        return min(default, room) if default is not None else room
    if value > room:
        raise RequestError(f"the prompt ({prompt_len} tokens) plus {param} ({value}) exceeds the context of "
                           f"{model.context_len} tokens; {param} may be at most {room}", param,
                           code="context_length_exceeded")
    return value


def _spec(body: dict, prompt_ids: list[int], max_tokens: int, logprobs: bool) -> GenerationSpec:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object, got {options!r}", "stream_options")
    include_usage = _boolean(options or {}, "include_usage")
    return GenerationSpec(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=_sampling(body), stop=_stop(body),
                          seed=_integer(body, "seed", None, -(1 << 63), (1 << 63) - 1),
                          n=_integer(body, "n", 1, 1, MAX_CHOICES), logprobs=logprobs, stream=stream,
                          include_usage=stream and include_usage)


# ------------------------------------------------------------------------------------------------ endpoints
def parse_chat(body: Any, model: ServedModel) -> GenerationSpec:
    """A ``/v1/chat/completions`` body (module doc); the messages rendered with the tokenizer's chat template."""
    body = _object(body)
    check_model(body, model)
    _refuse_unsupported(body, ("presence_penalty", "frequency_penalty", "logit_bias", "tools", "functions",
                               "tool_choice", "function_call", "response_format"))
    logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, 20)
    if top:
        raise RequestError("top_logprobs > 0 is not supported: the sampler records the log-prob of the chosen token "
                           "only (use logprobs=true with top_logprobs 0 or absent)", "top_logprobs")
    messages = _messages(body.get("messages"))
    try:
        prompt_ids = list(model.encode_chat(messages))
    except Exception as err:  # noqa: BLE001 -- the chat template raises jinja / ValueError on bad conversations
        raise RequestError(f"messages could not be rendered with the chat template: {err}", "messages") from None
    if not prompt_ids:
        raise RequestError("messages render to an empty prompt", "messages")
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _integer(body, param, None, 1)
    return _spec(body, prompt_ids, _max_tokens(value, param, "messages", len(prompt_ids), model, None), logprobs)


def parse_completion(body: Any, model: ServedModel) -> GenerationSpec:
    """A ``/v1/completions`` body (module doc); a string prompt is tokenized with the tokenizer's defaults."""
    body = _object(body)
    check_model(body, model)
    _refuse_unsupported(body, ("presence_penalty", "frequency_penalty", "logit_bias", "echo", "suffix", "best_of"))
    top = _integer(body, "logprobs", None, 0, 5)
    if top:
        raise RequestError("logprobs > 0 (top alternatives) is not supported: the sampler records the log-prob of "
                           "the chosen token only; use logprobs=0", "logprobs")
    prompt_ids = _prompt_ids(body.get("prompt"), model)
    value = _integer(body, "max_tokens", None, 1)
    max_tokens = _max_tokens(value, "max_tokens", "prompt", len(prompt_ids), model, DEFAULT_COMPLETION_MAX_TOKENS)
    return _spec(body, prompt_ids, max_tokens, top is not None)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string role", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                   for p in content):
                raise RequestError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts",
                               f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt_ids(prompt: Any, model: ServedModel) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(model.encode_text(prompt))
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})", "prompt")
    else:
        raise RequestError("prompt must be a string, a list of one string, or a list of token ids (one prompt per "
                           "request)", "prompt")
    if not ids:
        raise RequestError("prompt is empty (it needs at least one token)", "prompt")
    return ids
