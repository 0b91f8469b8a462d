"""Prompt templates: the ARPO tool-use system prompt, chat messages for a question, and chat-template rendering.

The RL parquet files (`rl/*.parquet`) all carry one system prompt. It was written in Python without a raw string,
so every ``\\boxed`` in it became a backspace character (``\\x08``) followed by ``oxed``. `SYSTEM_PROMPT` is that
prompt with the escape bug fixed; `fix_escape_bug` applies the same fix to any text read from the data.
The data has a single prompt for math and QA questions alike, so there is one template, not per-task variants.
"""
from __future__ import annotations

from typing import Any

_BACKSPACE = "\x08"

SYSTEM_PROMPT = (
    "You are a helpful assistant that can solve the given question step by step with the help of the wikipedia "
    "search tool and python interpreter tool. Given a question, you need to first think about the reasoning process "
    "in the mind and then provide the answer. During thinking, you can invoke the wikipedia search tool to search "
    "and python interpreter tool to calculate the math problem for fact information about specific topics if "
    "needed. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags "
    "respectively, and the search query and result are enclosed within <search> </search> and <result> </result> "
    "tags respectively. For example, <think> This is the reasoning process. </think> <search> search query here "
    "</search> <result> search result here </result> <think> This is the reasoning process. </think> <python> "
    "python code here </python> <result> python interpreter result here </result> <think> This is the reasoning "
    "process. </think> <answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. In the last part of "
    "the answer, the final exact answer is enclosed within \\boxed{} with latex format."
)


def fix_escape_bug(text: str) -> str:
    """Undo the lost ``\\b`` escape: every backspace char ``\\x08`` becomes the two characters ``\\b``.

    ``"\\x08oxed{}"`` -> ``"\\boxed{}"``; text without a backspace is returned unchanged.
    """
    return text.replace(_BACKSPACE, "\\b")


def question_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Chat messages for one question: ``[{"role": "system", ...}, {"role": "user", "content": question}]``.

    This is exactly the layout of the RL data's prompts (system prompt, then the bare question as the user turn).
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Render `messages` with the tokenizer's own chat template, ending with the assistant generation prompt.

    Equals ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``; raises
    ``ValueError`` naming the tokenizer when it has no chat template (instead of a silent fallback format).
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template; use an instruction-tuned tokenizer or set "
            "`tokenizer.chat_template` before building prompts"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
