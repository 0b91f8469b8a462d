"""The one prompt encoder: records -> records whose ``prompt_ids`` hold the tokenised chat prompt."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from appo_jax.data.records import Record
from appo_jax.data.templates import apply_chat_template


def with_system_prompt(messages: Sequence[dict], system_prompt: str) -> list[dict]:
    """``messages`` with the system turn replaced by ``system_prompt`` (inserted first when there is none); a
    copy, unchanged when ``system_prompt`` is empty."""
    out = [dict(m) for m in messages]
    if system_prompt:
        if out and out[0]["role"] == "system":
            out[0]["content"] = system_prompt
        else:
            out.insert(0, {"role": "system", "content": system_prompt})
    return out


def encode_prompt(tokenizer, messages: Sequence[dict]) -> tuple[int, ...]:
    """Token ids of chat ``messages`` rendered with the tokenizer's chat template (generation prompt appended),
    tokenised without extra special tokens: what the policy is conditioned on."""
    return tuple(tokenizer.encode(apply_chat_template(tokenizer, list(messages)), add_special_tokens=False))


def encode_records(records: Sequence[Record], tokenizer, *, max_prompt_len: int, system_prompt: str = ""
                   ) -> tuple[list[Record], list[Record]]:
    """``(kept, too_long)``: each record with ``prompt_ids`` = its chat messages (system turn replaced by
    ``system_prompt`` when given) rendered with the tokenizer's chat template, generation prompt appended,
    tokenised without extra special tokens; records whose prompt has more than ``max_prompt_len`` tokens go to
    ``too_long`` (the caller decides whether that is an error)."""
    kept, too_long = [], []
    for r in records:
        messages = with_system_prompt(r.prompt, system_prompt)
        ids = encode_prompt(tokenizer, messages)
        encoded = dataclasses.replace(r, prompt=messages, prompt_ids=ids)
        (kept if len(ids) <= max_prompt_len else too_long).append(encoded)
    return kept, too_long
