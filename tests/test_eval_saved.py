"""`appo-jax eval --out DIR`: every answer saved, resume after SIGKILL, refusal of mixed settings, the paper's
metrics (pass@k against brute force), breakdowns, and the LLM judge against endpoints of the test's own (one that
answers, one that is down, one that returns garbage, one that fails then recovers)."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appo_jax.evaluation.answer_store import AnswerStore
from appo_jax.evaluation.metrics import pass_at_k, summarize, summary_table
from appo_jax.rewards.judge import JudgeError, make_judge
from appo_jax.rewards.llm_judge import JUDGE_PROMPT, parse_verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------------ metrics
def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n runs (c correct) holding a correct run, by enumeration."""
    runs = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(runs[i] for i in s) for s in subsets) / len(subsets)


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_run(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in ((3, 4, 1), (3, 1, 0), (3, 1, 4), (2, -1, 1)):
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(n, c, k)


def _row(bench, qid, run, correct, f1=0.0, em=0.0, failed=False):
    return {"benchmark": bench, "question_id": qid, "run": run, "metrics": {"correct": correct, "f1": f1, "em": em},
            "judge": {"failed": failed}}


def test_summary_matches_a_slow_count_with_failed_judgements_left_out_and_breakdowns():
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for q in range(7):
        flags = rng.random(4) < 0.5
        truth[str(q)] = flags
        rows += [_row("gaia", str(q), r, bool(f), f1=float(f), em=float(f)) for r, f in enumerate(flags)]
    rows.append(_row("gaia", "0", 4, False, failed=True))  # a fifth run whose judge failed: not in pass@k
    levels = {str(q): {"level": "1" if q < 3 else "2"} for q in range(7)}
    s = summarize(rows, {"gaia": levels})["gaia"]
    assert s["judge_failed"] == 1 and s["runs"] == 5 and s["questions"] == 7 and s["answers"] == 29
    assert "pass@5" not in s  # question 0 has 4 judged runs: pass@k up to k = 4
    assert s["pass@1"] == pytest.approx(np.mean([f.mean() for f in truth.values()]))
    for k in (2, 3, 4):
        assert s[f"pass@{k}"] == pytest.approx(np.mean([brute_pass_at_k(4, int(f.sum()), k) for f in truth.values()]))
    assert s["f1"] == pytest.approx(sum(r["metrics"]["f1"] for r in rows) / len(rows))
    assert s["metric"] == "pass@1"
    low = s["by_level"]["1"]
    assert low["questions"] == 3 and low["pass@1"] == pytest.approx(np.mean([truth[q].mean() for q in "012"]))
    assert summarize([_row("hotpotqa", "a", 0, True, 1.0, 1.0)])["hotpotqa"]["metric"] == "f1"
    table = summary_table(summarize(rows, {"gaia": levels}))
    assert "| gaia level=1 | 3 | 5 |" in table and "pass@4 (%)" in table  # question 0: 5 runs, 4 judged


# -------------------------------------------------------------------------------------------------------- store
def test_store_drops_a_row_cut_by_a_kill_refuses_damage_duplicates_and_other_settings(tmp_path):
    settings = {"model_id": "m", "preset": "paper", "seed": 0}
    store = AnswerStore(tmp_path, settings)
    store.append(_row("gsm8k", "1", 0, True))
    store.append(_row("gsm8k", "1", 1, False))
    with pytest.raises(ValueError, match="already"):
        store.append(_row("gsm8k", "1", 1, False))
    with open(tmp_path / "answers.jsonl", "a") as f:
        f.write('{"benchmark": "gsm8k", "question_id": "2", "ru')  # SIGKILL mid-write
    again = AnswerStore(tmp_path, settings)
    assert [r["run"] for r in again.rows()] == [0, 1] and again.done("gsm8k", "1", 1) and not again.done("gsm8k", "2", 0)
    again.append(_row("gsm8k", "2", 0, True))
    assert len(AnswerStore(tmp_path, settings).rows()) == 3  # the cut row is gone, the new one is whole
    with pytest.raises(ValueError, match=r"preset: 'paper' -> 'official'.*another --out"):
        AnswerStore(tmp_path, {**settings, "preset": "official"})
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    (tmp_path / "answers.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"answers.jsonl:2: not a JSON row"):
        AnswerStore(tmp_path, settings)


# ---------------------------------------------------------------------------------------------------- LLM judge
class _Endpoint:
    """A tiny chat-completions server of the test's own: ``replies`` is consumed one per request; an int is an
    HTTP status to fail with, a string the message content to answer."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                reply = outer.replies.pop(0) if outer.replies else "Correct"
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "nope"}}')
                    return
                data = b"<html>" if reply == "<not json>" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_parse_verdict_is_strict():
    assert parse_verdict("Correct") and parse_verdict(" correct.\n") and not parse_verdict("INCORRECT")
    for reply in ("", "Correct!", "The answer is correct", "Correct\nIncorrect", "yes"):
        with pytest.raises(JudgeError):
            parse_verdict(reply)


def test_llm_judge_asks_once_at_temperature_zero_and_reads_the_verdict():
    ep = _Endpoint(["Correct", "Incorrect"])
    try:
        judge = make_judge("llm", url=ep.url, model="judge-72b", backoff_s=0.01)
        yes = judge.judge("Capital of France?", "Paris", ["Paris"])
        no = judge.judge("Capital of France?", "Lyon", ["Paris"])
        assert yes.correct and yes.raw == "Correct" and not no.correct and judge.name == "llm:judge-72b"
        path, body = ep.requests[0]
        assert path == "/v1/chat/completions" and body["model"] == "judge-72b" and body["temperature"] == 0
        assert body["messages"][0]["content"] == JUDGE_PROMPT.format(question="Capital of France?",
                                                                     references="Paris", prediction="Paris")
        assert not judge.judge("q", None, ["x"]).correct and len(ep.requests) == 2  # no answer: not asked
    finally:
        ep.close()


def test_llm_judge_retries_transient_errors_and_fails_clearly_on_garbage_down_or_refusal():
    ep = _Endpoint([503, 500, "Correct", "I think it might be right", "<not json>", 404])
    try:
        judge = make_judge("llm", url=ep.url, model="j", retries=3, backoff_s=0.01)
        assert judge.judge("q", "a", ["a"]).correct and len(ep.requests) == 3  # two 5xx, then the verdict
        with pytest.raises(JudgeError, match="not 'Correct' or 'Incorrect'") as err:
            judge.judge("q", "a", ["a"])
        assert err.value.raw == "I think it might be right"
        with pytest.raises(JudgeError, match="did not return a chat completion"):
            judge.judge("q", "a", ["a"])
        with pytest.raises(JudgeError, match="HTTP 404"):
            judge.judge("q", "a", ["a"])
        assert len(ep.requests) == 6  # a 404 is not retried
    finally:
        ep.close()
    down = make_judge("llm", url=ep.url, model="j", retries=2, backoff_s=0.01)
    t0 = time.perf_counter()
    with pytest.raises(JudgeError, match="after 3 attempts.*unreachable"):
        down.judge("q", "a", ["a"])
    assert time.perf_counter() - t0 >= 0.03  # backoff 0.01 + 0.02
    with pytest.raises(ValueError, match="http"):
        make_judge("llm", url="localhost:8000", model="j")


# ------------------------------------------------------------------------------------------------------ the CLI
EVAL_ARGS = ["eval", "--model", "tiny-llama", "--tokenizer", "smollm2-135m-instruct", "--max-response-len", "32",
             "--no-progress"]


def _answers(out) -> list[dict]:
    path = out / "answers.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


@pytest.mark.heavy(order=30)
def test_eval_saves_every_answer_resumes_after_sigkill_and_refuses_other_settings(tmp_path, capsys):
    from appo_jax.cli import main

    out = tmp_path / "ev"
    args = [*EVAL_ARGS, "--benchmarks", "gsm8k,hotpotqa", "--limit", "3", "--runs", "2", "--num-slots", "1",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "appo_jax.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(_answers(out)) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _answers(out)
    assert 2 <= len(before) < 12, f"the kill should land mid-run; {len(before)} answers were saved"
    capsys.readouterr()
    assert main(args) == 0  # the same command again resumes
    done = capsys.readouterr()
    assert f"{len(before)} already in" in done.err and f"{12 - len(before)} to sample" in done.err
    rows = _answers(out)
    keys = [(r["benchmark"], r["question_id"], r["run"]) for r in rows]
    assert len(rows) == 12 and len(set(keys)) == 12
    assert rows[:len(before)] == before  # finished answers are kept as they were, never sampled again
    row = rows[0]
    for field in ("model_id", "benchmark", "question_id", "question", "run", "sampling", "response", "tool_calls",
                  "finish_reason", "answer", "gold", "metrics", "judge"):
        assert field in row
    assert row["sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.1}
    assert row["judge"]["name"] == "rule" and row["model_id"].startswith("tiny-llama")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"gsm8k", "hotpotqa"} and summary["benchmarks"]["hotpotqa"]["metric"] == "f1"
    assert summary["benchmarks"]["gsm8k"]["runs"] == 2 and "pass@2" in summary["benchmarks"]["gsm8k"]
    assert "| gsm8k | 3 | 2 | pass@1 |" in done.out
    assert main(args) == 0 and "0 to sample" in capsys.readouterr().err and len(_answers(out)) == 12
    assert main([*args, "--preset", "official"]) == 2
    assert "preset: 'paper' -> 'official'" in capsys.readouterr().err


def test_the_judge_prompt_in_the_docs_is_the_one_sent():
    doc = open(os.path.join(ROOT, "docs", "evaluation.md"), encoding="utf-8").read()
    assert "```text\n" + JUDGE_PROMPT + "\n```" in doc
