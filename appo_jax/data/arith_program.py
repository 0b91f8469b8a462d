"""``arith_program``: multi-step arithmetic whose answer needs one ``<python>`` call with a correctly composed
expression.

A question lists ``steps`` operations applied to a running value (deterministic in the seed):

    "Start with 7. Add 5. Multiply by 3. Subtract it from 50. What is the result?"

The reference trace composes the whole program in one expression, innermost step first — which operator, which
operand, and in which order (``subtract it from 50`` is ``50 - x``, ``subtract 4`` is ``x - 4``):

    <think>Plan: add, multiply, subtract from.</think>
    <python>print(50 - ((7 + 5) * 3))</python><result>
    14
    </result>
    <answer>\\boxed{14}</answer>

A *wrong* trace (share ``wrong_fraction`` of the SFT demonstrations) takes one wrong decision at a random step: the
wrong operator, or the operands of a subtraction in the wrong order; the observation is the real output of that
wrong program, and the boxed answer copies it.

A *confused* trace (share ``order_confusion``, independently) comes from a teacher that reads "Subtract it from y"
as "Subtract y": every such step is planned and written as ``x - y``. Unlike the random wrong decisions (spread
over three wrong operators, so the most likely choice stays right), a confusion share above one half makes the
wrong order the *most likely* choice after SFT: greedy decoding gets those questions wrong, and only the outcome
reward can teach the right order (the RL regime of docs/mini_reproduction.md).

Decision tokens (docs/mini_reproduction.md): the operation words of the plan, every operator and number inside
the ``<python>`` code, and the boxed answer; `decision_spans` returns their character spans.

Splits: a question falls in ``train`` or ``heldout`` by a hash of its text (disjoint); ``seed`` draws questions.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from appo_jax.data.records import Record
from appo_jax.data.tasks import check_options, hash_split
from appo_jax.data.templates import question_messages
from appo_jax.protocol import format_observation

SYSTEM_PROMPT = ("Compute the result. Plan inside <think> </think>, write one expression inside <python> print(...) "
                 "</python>, and answer inside <answer> </answer> as \\boxed{NUMBER}.")
#: (plan word, question sentence, expression of the running value x and operand y)
OPERATIONS = {
    "add": ("Add {y}.", "({x} + {y})"),
    "subtract": ("Subtract {y}.", "({x} - {y})"),
    "multiply": ("Multiply by {y}.", "({x} * {y})"),
    "from": ("Subtract it from {y}.", "({y} - {x})"),
}
_NAMES = tuple(OPERATIONS)


@dataclasses.dataclass(frozen=True)
class ArithOptions:
    """Difficulty knobs: ``steps`` (min, max) operations after the start value; operands in [2, ``max_operand``];
    ``wrong_fraction``: share of SFT demonstrations with one wrong decision; ``order_confusion``: share of SFT
    demonstrations that write every "subtract it from y" as ``x - y`` (module doc)."""

    steps: tuple[int, int] = (2, 3)
    max_operand: int = 9
    wrong_fraction: float = 0.3
    order_confusion: float = 0.0

    def __post_init__(self):
        check_options("arith_program", {"max_operand": (self.max_operand, 2, 99),
                                        "wrong_fraction": (self.wrong_fraction, 0.0, 1.0),
                                        "order_confusion": (self.order_confusion, 0.0, 1.0)},
                      {"steps": (self.steps, 1, 6)})


Program = tuple[int, tuple[tuple[str, int], ...]]  # start value, ((operation, operand), ...)


def question_text(program: Program) -> str:
    start, ops = program
    return " ".join([f"Start with {start}."] + [OPERATIONS[o][0].format(y=y) for o, y in ops]
                    + ["What is the result?"])


def expression(program: Program) -> str:
    """The one Python expression of the program (outer parentheses dropped)."""
    start, ops = program
    expr = str(start)
    for o, y in ops:
        expr = OPERATIONS[o][1].format(x=expr, y=y)
    return expr[1:-1] if expr.startswith("(") else expr


def evaluate(program: Program) -> int:
    start, ops = program
    x = start
    for o, y in ops:
        x = {"add": x + y, "subtract": x - y, "multiply": x * y, "from": y - x}[o]
    return x


def parse_question(question: str) -> Program:
    """The program of a question made by `question_text`."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    start = int(sentences[0].removeprefix("Start with "))
    ops = []
    for s in sentences[1:]:
        if s.startswith("What is"):
            break
        for name, (template, _) in OPERATIONS.items():
            m = re.fullmatch(re.escape(template.format(y="@")).replace("@", r"(\d+)").rstrip(r"\."), s)
            if m:
                ops.append((name, int(m.group(1))))
                break
        else:
            raise ValueError(f"arith_program: cannot parse the step {s!r}")
    return start, tuple(ops)


def _draw(rng: np.random.Generator, options: ArithOptions) -> Program:
    lo, hi = options.steps
    steps = int(rng.integers(lo, hi + 1))
    start = int(rng.integers(2, options.max_operand + 1))
    ops = tuple((_NAMES[int(rng.integers(len(_NAMES)))], int(rng.integers(2, options.max_operand + 1)))
                for _ in range(steps))
    return start, ops


def arith_records(split: str, count: int, seed: int, options: ArithOptions = ArithOptions()) -> list[Record]:
    """``count`` distinct questions of ``split`` drawn with ``seed`` (rejection on the split hash)."""
    rng = np.random.default_rng([seed, 17, 0 if split == "train" else 1])
    out, seen = [], set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise ValueError(f"arith_program: the options {options} give fewer than {count} {split} questions")
        program = _draw(rng, options)
        q = question_text(program)
        if hash_split(q) != split or q in seen:
            continue
        seen.add(q)
        out.append(Record(f"{split}-{len(out)}", q, [str(evaluate(program))], "arith_program", "arith_program",
                          "math", question_messages(q, SYSTEM_PROMPT)))
    return out


def _wrong(program: Program, rng: np.random.Generator) -> Program:
    start, ops = program
    ops = list(ops)
    k = int(rng.integers(len(ops)))
    name, y = ops[k]
    swaps = {"subtract": "from", "from": "subtract"}
    if name in swaps and rng.random() < 0.5:
        ops[k] = (swaps[name], y)  # operands in the wrong order
    else:
        ops[k] = (_NAMES[(_NAMES.index(name) + int(rng.integers(1, len(_NAMES)))) % len(_NAMES)], y)
    return start, tuple(ops)


def arith_traces(records: Sequence[Record], tools: Any, options: ArithOptions = ArithOptions(), seed: int = 0
                 ) -> list[dict]:
    """SFT demonstrations with observations from the python tool of ``tools`` (the real sandbox; calls run
    concurrently through ``tools.submit`` when the registry has it, else ``tools.call``); a share
    ``options.wrong_fraction`` takes one wrong decision, a share ``options.order_confusion`` writes every
    "subtract it from" step as a subtraction (module doc)."""
    rng = np.random.default_rng([seed, 19])
    programs = []
    for rec in records:
        program = parse_question(rec.question)
        if rng.random() < options.wrong_fraction:
            program = _wrong(program, rng)
        if rng.random() < options.order_confusion:
            program = (program[0], tuple(("subtract" if o == "from" else o, y) for o, y in program[1]))
        programs.append(program)
    codes = [f"print({expression(p)})" for p in programs]
    if hasattr(tools, "submit"):
        futures = [tools.submit("python", code) for code in codes]
        results = [f.result().text for f in futures]
    else:
        results = [tools.call("python", code).text for code in codes]
    out = []
    for rec, program, code, result in zip(records, programs, codes, results):
        plan = ", ".join(name if name != "from" else "subtract from" for name, _ in program[1])
        value = result.strip().splitlines()[-1] if result.strip() else ""
        out.append({"messages": rec.prompt, "segments": [
            {"text": f"<think>Plan: {plan}.</think>\n<python>{code}</python>", "generated": True},
            {"text": format_observation(result), "generated": False},
            {"text": f"\n<answer>\\boxed{{{value}}}</answer>", "generated": True},
        ]})
    return out


def decision_spans(record: Record, response: str) -> list[tuple[int, int]]:
    """Character spans of the decision tokens in ``response`` (module doc): the operation words inside the first
    ``<think>`` block, every operator and number inside ``<python>`` blocks, and the contents of ``\\boxed{}``."""
    spans = []
    think = re.search(r"<think>(.*?)</think>", response, re.S)
    if think is not None:
        for m in re.finditer(r"[a-z]+", think.group(1)):
            if m.group(0) in OPERATIONS:
                spans.append((think.start(1) + m.start(), think.start(1) + m.end()))
    for m in re.finditer(r"<python>(.*?)</python>", response, re.S):
        for t in re.finditer(r"\d+|[-+*/]", m.group(1)):
            spans.append((m.start(1) + t.start(), m.start(1) + t.end()))
    for m in re.finditer(r"\\boxed\{([^}]*)\}", response):
        spans.append((m.start(1), m.end(1)))
    return sorted(spans)
