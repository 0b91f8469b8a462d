"""A small tool-use task for CPU demos and tests: integer arithmetic questions answered with the python tool.

``arithmetic_records(n, seed)`` gives questions such as "What is 37 * 12?" with the exact result as ground
truth (ability "math", so the default reward is ``arpo_math``). ``arithmetic_traces(records, tools)`` writes one
tool-use trace per question in the ARPO protocol (docs/protocol.md) for cold-start SFT; the ``<result>`` block is
produced by actually running the python tool of ``tools``:

    <think>I need {a} {op} {b}. I will compute it with python.</think>
    <python>print({a} {op} {b})</python><result>
    {tool output}
    </result>
    <think>The result is {value}.</think>
    <answer>The answer is \\boxed{{value}}.</answer>
"""
from __future__ import annotations

import numpy as np

from appo_jax.data.templates import question_messages
from appo_jax.training.prompts import PromptRecord
from appo_jax.tools.result import format_observation

#: A short system prompt for small models (the protocol of the RL data's prompt in three sentences).
SHORT_SYSTEM_PROMPT = (
    "Solve the question. Think inside <think> </think>, run python code inside <python> </python> (its output "
    "comes back inside <result> </result>), and give the final answer inside <answer> </answer> as \\boxed{}.")

_OPS = ("+", "-", "*")


def arithmetic_records(n: int, seed: int = 0, system_prompt: str = SHORT_SYSTEM_PROMPT) -> list[PromptRecord]:
    """``n`` questions "What is a op b?" (a, b in [10, 99], op in + - *), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(10, 100, 2))
        op = _OPS[int(rng.integers(0, len(_OPS)))]
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = f"What is {a} {op} {b}?"
        out.append(PromptRecord(question_messages(question, system_prompt), [str(value)], "math",
                                "toy_arithmetic", str(i)))
    return out


def _operands(question: str) -> str:
    return question.removeprefix("What is ").removesuffix("?")


def arithmetic_traces(records, tools) -> list[dict]:
    """SFT examples ``{"messages", "segments"}`` (segments: ``[{"text", "generated"}]``) for the records, the
    observation made by running the python tool of the ``tools`` registry."""
    out = []
    for r in records:
        expr = _operands(r.messages[-1]["content"])
        result = tools.call("python", f"print({expr})")
        value = r.ground_truths[0]
        segments = [
            {"text": f"<think>I need {expr}. I will compute it with python.</think>\n<python>print({expr})</python>",
             "generated": True},
            {"text": format_observation(result.text), "generated": False},
            {"text": f"\n<think>The result is {value}.</think>\n<answer>The answer is \\boxed{{{value}}}.</answer>",
             "generated": True},
        ]
        out.append({"messages": r.messages, "segments": segments})
    return out
