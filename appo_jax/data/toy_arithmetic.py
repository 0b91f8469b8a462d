"""``toy_arithmetic``: integer arithmetic questions answered with the python tool, for CPU demos and tests.

Questions are "What is a op b?" (a, b in [10, 99], op in + - *), deterministic in the seed, with the exact
result as ground truth (ability "math", so the default reward is ``arpo_math``). Its SFT traces follow the
tool protocol (docs/protocol.md); the ``<result>`` block comes from actually running the python tool:

    <think>I need {a} {op} {b}. I will compute it with python.</think>
    <python>print({a} {op} {b})</python><result>
    {tool output}
    </result>
    <think>The result is {value}.</think>
    <answer>The answer is \\boxed{{value}}.</answer>
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from appo_jax.data.records import Record
from appo_jax.protocol import format_observation
from appo_jax.data.tasks import Task
from appo_jax.data.templates import question_messages

#: A short system prompt for small models (the protocol of the RL data's prompt in three sentences).
SHORT_SYSTEM_PROMPT = (
    "Solve the question. Think inside <think> </think>, run python code inside <python> </python> (its output "
    "comes back inside <result> </result>), and give the final answer inside <answer> </answer> as \\boxed{}.")

_OPS = ("+", "-", "*")


def arithmetic_records(n: int, seed: int = 0, system_prompt: str = SHORT_SYSTEM_PROMPT) -> list[Record]:
    """``n`` questions "What is a op b?" (a, b in [10, 99], op in + - *), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(10, 100, 2))
        op = _OPS[int(rng.integers(0, len(_OPS)))]
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = f"What is {a} {op} {b}?"
        out.append(Record(str(i), question, [str(value)], "toy_arithmetic", "toy_arithmetic", "math",
                          question_messages(question, system_prompt)))
    return out


def arithmetic_traces(records: Sequence[Record], tools: Any) -> list[dict]:
    """SFT examples ``{"messages", "segments"}`` (segments: ``[{"text", "generated"}]``) for the records, the
    observation made by running the python tool of ``tools`` (``tools.call("python", code).text``)."""
    out = []
    for r in records:
        expr = r.question.removeprefix("What is ").removesuffix("?")
        result = tools.call("python", f"print({expr})")
        value = r.ground_truths[0]
        segments = [
            {"text": f"<think>I need {expr}. I will compute it with python.</think>\n<python>print({expr})</python>",
             "generated": True},
            {"text": format_observation(result.text), "generated": False},
            {"text": f"\n<think>The result is {value}.</think>\n<answer>The answer is \\boxed{{{value}}}.</answer>",
             "generated": True},
        ]
        out.append({"messages": r.prompt, "segments": segments})
    return out


TOY_ARITHMETIC = Task("toy_arithmetic", ("train",), lambda split, count, seed, options: arithmetic_records(count, seed),
                      lambda records, tools, options, seed: arithmetic_traces(records, tools))
