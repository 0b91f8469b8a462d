"""``kb_multihop``: questions over a synthetic knowledge base that need one ``<search>`` per hop.

The world (deterministic in ``KbOptions.world_seed``): ``entities`` made-up person names and ``relations`` kinship /
work relations; every (entity, relation) pair has exactly one target entity (never itself). A question composes
``hops`` relations, written outermost first:

    "Who is the boss of the friend of Rilo?"      = boss(friend(Rilo))

and is answered by searching the innermost fact first. The search backend over this world is the ``kb`` backend
of `appo_jax.tools.kb_search` (each result page is one fact; the right one is shuffled among ``distractors``
facts about the same entity or the same relation). The reference trace (the SFT demonstration):

    <think>Plan: friend, then boss.</think>
    <search>friend of Rilo</search><result>
    Page 1: The mother of Rilo is Tamu.
    Page 2: The friend of Rilo is Kesa.
    </result>
    <search>boss of Kesa</search><result>
    ...
    </result>
    <answer>\\boxed{Mori}</answer>

A *wrong* trace (a share ``wrong_fraction`` of the SFT demonstrations) takes one wrong decision at a random hop:
the plan and the query name a wrong relation there, and the trace follows its consequences to a wrong answer.

A *confused* trace (share ``order_confusion``, independently) comes from a teacher that resolves the relations in
the order the question writes them (outermost first: "boss of the friend of Rilo" searched as ``boss of Rilo``,
then ``friend of`` that), following the real search results to a wrong answer. A confusion share above one half
makes the wrong order the most likely choice after SFT, which only the outcome reward can correct (the RL regime
of docs/mini_reproduction.md).

Decision tokens (docs/mini_reproduction.md): the relation words of the plan, the relation and the entity of every
query, and the boxed answer; `decision_spans` returns their character spans in a response.

Splits: every question (start entity, relation chain) falls in ``train`` or ``heldout`` by a hash of its text, so
the splits are disjoint; records of a split are drawn from its questions with ``seed``.
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

SYSTEM_PROMPT = ("Answer the question. Plan inside <think> </think>, look up one fact per <search> REL of NAME "
                 "</search>, and answer inside <answer> </answer> as \\boxed{NAME}.")
RELATIONS = ("mother", "father", "boss", "friend", "teacher", "neighbor", "coach", "doctor")
_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_QUERY = re.compile(r"^\s*(\w+) of (\w+)\s*$")


@dataclasses.dataclass(frozen=True)
class KbOptions:
    """Difficulty knobs. ``hops``: (min, max) relations per question; ``distractors``: wrong facts shown beside
    the right one on every search; ``entities`` / ``relations``: size of the world; ``wrong_fraction``: share of
    SFT demonstrations that take one wrong decision; ``order_confusion``: share of SFT demonstrations that
    resolve the relations outermost first (module doc); ``world_seed``: the knowledge base."""

    hops: tuple[int, int] = (2, 3)
    distractors: int = 2
    entities: int = 24
    relations: int = 4
    wrong_fraction: float = 0.3
    order_confusion: float = 0.0
    world_seed: int = 0

    def __post_init__(self):
        check_options("kb_multihop", {"relations": (self.relations, 2, len(RELATIONS)),
                                      "entities": (self.entities, 4, 200), "distractors": (self.distractors, 0, 8),
                                      "wrong_fraction": (self.wrong_fraction, 0.0, 1.0),
                                      "order_confusion": (self.order_confusion, 0.0, 1.0)},
                      {"hops": (self.hops, 1, 6)})


@dataclasses.dataclass(frozen=True)
class World:
    """The knowledge base: ``names`` [E], ``relations`` [R], ``target[e, r]`` the entity that relation r of e is."""

    names: tuple[str, ...]
    relations: tuple[str, ...]
    target: np.ndarray

    def fact(self, e: int, r: int) -> str:
        """The page text of one fact."""
        return f"The {self.relations[r]} of {self.names[e]} is {self.names[self.target[e, r]]}."

    def follow(self, start: int, chain: Sequence[int]) -> list[int]:
        """Entities visited applying the relation ids ``chain`` (innermost first) from ``start``."""
        out = [start]
        for r in chain:
            out.append(int(self.target[out[-1], r]))
        return out


def make_world(options: KbOptions) -> World:
    """The world of ``options`` (names: distinct two-syllable CV-CV strings, capitalised)."""
    rng = np.random.default_rng([options.world_seed, 7])
    syllables = [c + v for c in _ONSETS for v in _VOWELS]
    names: list[str] = []
    seen = set()
    while len(names) < options.entities:
        a, b = rng.choice(len(syllables), 2)
        name = (syllables[a] + syllables[b]).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    e, r = options.entities, options.relations
    target = (np.arange(e)[:, None] + rng.integers(1, e, (e, r))) % e  # never the entity itself
    return World(tuple(names), RELATIONS[:r], target.astype(np.int32))


def question_text(world: World, start: int, chain: Sequence[int]) -> str:
    """``"Who is the boss of the friend of Rilo?"`` for chain (friend, boss) (innermost first)."""
    words = " of ".join(f"the {world.relations[r]}" for r in reversed(chain))
    return f"Who is {words} of {world.names[start]}?"


def _questions(world: World, options: KbOptions, split: str) -> list[tuple[int, tuple[int, ...]]]:
    """Every (start, chain) of ``split`` (chains without a relation repeated back to back)."""
    out = []
    lo, hi = options.hops
    for hops in range(lo, hi + 1):
        chains = [()]
        for _ in range(hops):
            chains = [c + (r,) for c in chains for r in range(len(world.relations)) if not c or c[-1] != r]
        for start in range(len(world.names)):
            for chain in chains:
                if hash_split(question_text(world, start, chain)) == split:
                    out.append((start, chain))
    return out


def kb_records(split: str, count: int, seed: int, options: KbOptions = KbOptions()) -> list[Record]:
    """``count`` questions of ``split`` drawn (without replacement while the split lasts) with ``seed``."""
    world = make_world(options)
    pool = _questions(world, options, split)
    rng = np.random.default_rng([seed, 11])
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-count // len(pool)))])[:count]
    out = []
    for i, k in enumerate(order):
        start, chain = pool[int(k)]
        q = question_text(world, start, chain)
        answer = world.names[world.follow(start, chain)[-1]]
        out.append(Record(f"{split}-{i}", q, [answer], "kb_multihop", "kb_multihop", "qa",
                          question_messages(q, SYSTEM_PROMPT)))
    return out


def parse_question(world: World, question: str) -> tuple[int, tuple[int, ...]]:
    """(start, chain innermost first) of a question made by `question_text`."""
    body = question.removeprefix("Who is ").removesuffix("?")
    parts = body.split(" of ")
    rels = [p.removeprefix("the ") for p in parts[:-1]]
    return world.names.index(parts[-1]), tuple(world.relations.index(r) for r in reversed(rels))


def _trace_text(world: World, start: int, chain: Sequence[int], tools: Any) -> list[dict]:
    plan = ", then ".join(world.relations[r] for r in chain)
    segments = [{"text": f"<think>Plan: {plan}.</think>\n", "generated": True}]
    entity = start
    for r in chain:
        query = f"{world.relations[r]} of {world.names[entity]}"
        segments[-1]["text"] += f"<search>{query}</search>"
        segments.append({"text": format_observation(tools.call("search", query).text), "generated": False})
        segments.append({"text": "\n", "generated": True})
        entity = int(world.target[entity, r])
    segments[-1]["text"] += f"<answer>\\boxed{{{world.names[entity]}}}</answer>"
    return segments


def kb_traces(records: Sequence[Record], tools: Any, options: KbOptions = KbOptions(), seed: int = 0) -> list[dict]:
    """SFT demonstrations (``{"messages", "segments"}``) with observations from ``tools.call("search", query)``
    (a registry whose search backend is this world's ``kb`` backend); a share ``options.wrong_fraction`` replaces
    the relation of one random hop by another, a share ``options.order_confusion`` resolves the relations
    outermost first (module doc)."""
    world = make_world(options)
    rng = np.random.default_rng([seed, 13])
    out = []
    for rec in records:
        start, chain = parse_question(world, rec.question)
        chain = list(chain)
        if rng.random() < options.wrong_fraction:
            hop = int(rng.integers(len(chain)))
            chain[hop] = int((chain[hop] + rng.integers(1, len(world.relations))) % len(world.relations))
        if rng.random() < options.order_confusion:
            chain = chain[::-1]
        out.append({"messages": rec.prompt, "segments": _trace_text(world, start, chain, tools)})
    return out


def decision_spans(record: Record, response: str) -> list[tuple[int, int]]:
    """Character spans of the decision tokens in ``response`` (module doc): relation words inside the first
    ``<think>`` block, the relation and entity of each ``<search>`` query, and the contents of ``\\boxed{}``."""
    spans = []
    think = re.search(r"<think>(.*?)</think>", response, re.S)
    if think is not None:
        for m in re.finditer(r"[a-z]+", think.group(1)):
            if m.group(0) in RELATIONS:
                spans.append((think.start(1) + m.start(), think.start(1) + m.end()))
    for m in re.finditer(r"<search>(.*?)</search>", response, re.S):
        q = _QUERY.match(m.group(1))
        if q is not None:
            spans.append((m.start(1) + q.start(1), m.start(1) + q.end(1)))
            spans.append((m.start(1) + q.start(2), m.start(1) + q.end(2)))
        elif m.group(1).strip():
            spans.append((m.start(1), m.end(1)))
    for m in re.finditer(r"\\boxed\{([^}]*)\}", response):
        spans.append((m.start(1), m.end(1)))
    return sorted(spans)
