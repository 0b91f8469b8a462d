"""`appo-jax serve`: the scheduler, the generated-text bookkeeping and the OpenAI-compatible HTTP server.

The unit tests drive `GeneratedText` with a byte vocabulary (token i = byte i, so multi-byte characters span
tokens) and a `BatchScheduler` over the ``tiny-llama`` preset without HTTP. The server tests start
``python -m appo_jax.cli serve`` once for the module (4 slots, 256-token context, a free port) and talk to it with
the ``openai`` client and raw HTTP.

The weights are random ``tiny-llama`` ones made *sharp* (`test_sampler._sharp_params`: 8x layer matrices, 30x
final norm; the server's are exported as an HF directory with SmolLM2's vocabulary and served with
``--tokenizer smollm2-135m-instruct``). Plain random init gives near-uniform next-token distributions whose argmax
is the previous token (tied embeddings): every greedy answer would be one token repeated, and "batched equals
alone" would hold trivially. Sharp weights give varied greedy text with log-probs between 0 and -3, so the
comparisons of batched and lone requests test the numerics too.
"""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from test_sampler import _sharp_params

from appo_jax.models.hf_io import export_hf
from appo_jax.models.loading import load_tokenizer
from appo_jax.models.presets import get_config
from appo_jax.rollout.sampler import Sampler
from appo_jax.rollout.sampling import SamplingParams
from appo_jax.serving.generated_text import GeneratedText
from appo_jax.serving.scheduler import (
    BatchScheduler,
    Delta,
    GenerationRequest,
    seed_key,
)

MODEL = "tiny-sharp"  # the served model name
SLOTS, CONTEXT = 4, 256


def _bytes_text(ids) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def _ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------ GeneratedText
def test_multibyte_characters_are_never_split_and_the_text_is_the_decode_of_all_ids():
    text = GeneratedText(_bytes_text)
    target = "héllo 日本語 ok"
    pieces = []
    for b in _ids(target):  # one byte per token: the 3-byte characters span 3 tokens
        assert text.extend([b]) is None
        pieces.append(text.take(final=False))
        assert "\ufffd" not in pieces[-1]
    pieces.append(text.take(final=True))
    assert "".join(pieces) == target == text.text


def test_stop_string_spanning_tokens_cuts_the_text_and_drops_later_tokens():
    text = GeneratedText(_bytes_text, stop=("END",))
    assert text.extend(_ids("abcE")) is None
    assert text.take(final=False) == "abc"  # "E" could start "END": held back
    assert text.extend(_ids("X")) is None and text.take(final=False) == "EX"
    kept = text.extend(_ids("ENDmore"))
    assert kept == 3 and text.stopped  # up to the token completing "END"; "more" dropped
    assert text.ids == _ids("abcEXEND") and text.text == "abcEX"
    assert text.take(final=True) == ""
    # the stop that completes first wins, even if another one starts earlier
    text = GeneratedText(_bytes_text, stop=("abcd", "c"))
    assert text.extend(_ids("abcdef")) == 3 and text.text == "ab" and text.take(final=True) == "ab"


def test_seed_key_is_prng_key():
    for seed in (0, 7, 2**32 - 1):
        np.testing.assert_array_equal(seed_key(seed), np.asarray(jax.random.PRNGKey(seed)))
    assert seed_key(2**32 + 3).tolist() == [1, 3] and seed_key(-1).tolist() == [2**32 - 1] * 2
    with pytest.raises(ValueError, match="seed"):
        seed_key(2**63)


# ------------------------------------------------------------------------------------------ scheduler
@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny-llama", eos_token_ids=())  # no early EOS: every request runs to max_tokens
    return config, _sharp_params(config, 3)


class _Collector:
    """A request's sink: every delta, and an event set by the final one."""

    def __init__(self, on_delta=None):
        self.deltas: list[Delta] = []
        self.done = threading.Event()
        self.on_delta = on_delta

    def __call__(self, delta: Delta) -> None:
        self.deltas.append(delta)
        if self.on_delta:
            self.on_delta(delta)
        if delta.final:
            self.done.set()

    def tokens(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]


def _request(prompt, max_tokens, sampling, key, sink, **kw) -> GenerationRequest:
    return GenerationRequest(prompt, max_tokens, sampling, np.asarray(key, np.uint32), sink, **kw)


def _alone(config, params, prompt, max_tokens, sampling, key, max_len) -> list[int]:
    s = Sampler(config, params, num_slots=1, max_len=max_len, decode_chunk=4)
    s.start([0], [prompt], [np.asarray(key, np.uint32)])
    out = s.decode(np.ones(1, bool), max_tokens, sampling=sampling)
    return out.tokens[0, :out.num_new[0]].tolist()


def test_scheduler_admits_into_the_running_batch_and_matches_requests_alone(tiny):
    config, params = tiny
    sched = BatchScheduler(config, params, _bytes_text, num_slots=2, context_len=64, decode_chunk=4)
    sched.start()
    try:
        first_delta = threading.Event()
        a = _Collector(lambda d: first_delta.set())
        specs = {"a": ([1, 5, 9, 33], 24, SamplingParams(0.0), seed_key(1)),
                 "b": ([1, 7], 10, SamplingParams(1.0), seed_key(2)),
                 "c": ([1, 40, 41, 42, 43, 44], 12, SamplingParams(0.0), seed_key(3))}
        sinks = {"a": a, "b": _Collector(), "c": _Collector()}
        sched.submit(_request(*specs["a"], a))
        assert first_delta.wait(60)  # "a" runs; "b" joins it, "c" waits for a free slot
        for name in "bc":
            sched.submit(_request(*specs[name], sinks[name]))
        for sink in sinks.values():
            assert sink.done.wait(60)
        for name, (prompt, max_tokens, sampling, key) in specs.items():
            got = sinks[name]
            assert got.deltas[-1].finish_reason == "length" and got.deltas[-1].completion_tokens == max_tokens
            assert got.tokens() == _alone(config, params, prompt, max_tokens, sampling, key, sched.cache_len), name
            assert "".join(d.text for d in got.deltas) == _bytes_text(got.tokens())
        assert sched.status()["busy_slots"] == 0
    finally:
        sched.stop()


def test_scheduler_cancel_and_error_recovery(tiny):
    config, params = tiny
    sched = BatchScheduler(config, params, _bytes_text, num_slots=2, context_len=64, decode_chunk=4)
    sched.start()
    try:
        cancelled = _Collector()
        request = _request([1, 2, 3], 40, SamplingParams(0.0), seed_key(0), cancelled)
        cancelled.on_delta = lambda d: request.cancel()  # the consumer goes away after the first delta
        sched.submit(request)
        deadline = time.time() + 60
        while sched.status()["cancelled"] < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert sched.status()["cancelled"] == 1 and sched.status()["busy_slots"] == 0
        assert len(cancelled.deltas) == 1 and not cancelled.done.is_set()

        calls = []

        def broken(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("device fell over")

        sched.sampler.decode = broken  # the next decode fails; the scheduler replaces the sampler
        failed, after = _Collector(), _Collector()
        sched.submit(_request([1, 2, 3], 8, SamplingParams(0.0), seed_key(0), failed))
        assert failed.done.wait(60)
        assert failed.deltas[-1].error_status == 500 and "device fell over" in failed.deltas[-1].error
        sched.submit(_request([1, 2, 3], 8, SamplingParams(0.0), seed_key(0), after))
        assert after.done.wait(60) and after.deltas[-1].finish_reason == "length"
        assert calls == [1] and sched.status()["errors"] == 1 and sched.status()["running"]

        def broken_start(*args, **kwargs):
            raise RuntimeError("prefill fell over")

        sched.sampler.start = broken_start  # a failure while admitting fails the requests being admitted
        failed = _Collector()
        sched.submit(_request([1, 2, 3], 8, SamplingParams(0.0), seed_key(0), failed))
        assert failed.done.wait(60) and "prefill fell over" in failed.deltas[-1].error
        assert sched.status()["errors"] == 2 and sched.status()["busy_slots"] == 0
    finally:
        sched.stop()


# ------------------------------------------------------------------------------------------ the HTTP server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(base_url, log_path)`` of one `appo-jax serve` subprocess for the module, serving sharp random
    tiny-llama weights (module doc) from an HF directory."""
    tmp = tmp_path_factory.mktemp("serve")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = get_config("tiny-llama", vocab_size=len(tokenizer), eos_token_ids=(tokenizer.eos_token_id,),
                        pad_token_id=tokenizer.pad_token_id)
    export_hf(_sharp_params(config, 0), config, str(tmp / "model"))
    log_path = tmp / "serve.log"
    cmd = [sys.executable, "-m", "appo_jax.cli", "serve", "--model", str(tmp / "model"), "--served-model-name", MODEL,
           "--tokenizer", "smollm2-135m-instruct", "--max-len", str(CONTEXT), "--num-slots", str(SLOTS),
           "--port", "0", "--log-level", "warning"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, url = time.time() + 180, None
        while url is None:
            match = re.search(r"ready on (http://\S+) ", log_path.read_text())
            if match:
                url = match.group(1)
            elif proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"appo-jax serve did not start (exit {proc.poll()}):\n{log_path.read_text()}")
            else:
                time.sleep(0.2)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _post(url: str, path: str, body, timeout: float = 120) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as resp:
        return json.loads(resp.read())


def _open_stream(url: str, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    return conn, resp


def _events(resp: http.client.HTTPResponse):
    """The ``data:`` payloads of a server-sent event stream, as they arrive."""
    while True:
        line = resp.fp.readline()
        if not line:
            return
        line = line.decode().strip()
        if line.startswith("data: "):
            yield line[len("data: "):]


def _stream(url: str, path: str, body: dict) -> list[dict]:
    conn, resp = _open_stream(url, path, body)
    try:
        payloads = list(_events(resp))
    finally:
        conn.close()
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


def test_models_and_health(server):
    url, _ = server
    models = _get(url, "/v1/models")
    assert [m["id"] for m in models["data"]] == [MODEL] and "sha256:" in models["data"][0]["model_id"]
    health = _get(url, "/health")
    assert health["status"] == "ok" and health["slots"] == SLOTS and health["context"] == CONTEXT


def test_chat_and_completions_non_streaming(client):
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 5
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert "sha256:" in chat.system_fingerprint
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=9, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens == 9
    assert done.choices[0].finish_reason == "length" and done.choices[0].text


def test_streaming_equals_non_streaming(server, client):
    url, _ = server
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 20, "temperature": 0}
    chunks = _stream(url, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    _, whole = _post(url, "/v1/chat/completions", body)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    # completions, with the openai client's stream and usage
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 17, "temperature": 0}
    parts = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert parts[-1].usage.completion_tokens == 17 and not parts[-1].choices
    assert "".join(p.choices[0].text for p in parts[:-1]) == client.completions.create(**kw).choices[0].text


def _chat_request(i: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Question {i}: " + "tell me more " * i}],
            "max_tokens": 10 + 5 * i, "temperature": 0}


def _answer(body: dict) -> tuple[list, list[float]]:
    """(per choice: text, finish reason; every token's log-prob, if asked for) of a chat or completion
    response."""
    out, logprobs = [], []
    for c in body["choices"]:
        out.append((c["message"]["content"] if "message" in c else c["text"], c["finish_reason"]))
        lp = c["logprobs"] or {"token_logprobs": []}
        logprobs += [x["logprob"] for x in lp["content"]] if "content" in lp else lp["token_logprobs"]
    return out, logprobs


def test_concurrent_clients_get_the_answers_they_get_alone(server):
    """8 clients at once on 4 slots (half of them join the batch as others finish): every answer (6 greedy, 2
    seeded at temperature 1 with top_p 0.9, decoded as one group) equals the same request made alone: same text
    and tokens, log-probs equal up to float32 rounding.

    The batched and lone programs differ in the last bits (other batch heights, attention windows and prefill
    padding: |d log-prob| up to ~1.2e-5 measured). Greedy tokens never flipped (no near-ties); an untruncated
    temperature-1 draw can flip where it lands in the low-probability tail (CDF intervals ~1e-5 wide next to a
    ~1e-6 rounding difference: seen once in ~10 runs, at a token of log-prob -11.6), hence top_p 0.9 here (no
    tail draws) and the exact temperature-1 check below on identical runs."""
    url, _ = server
    bodies = [{**_chat_request(i), "logprobs": True} for i in range(6)]
    bodies += [{"model": MODEL, "prompt": f"Random words {seed}:", "max_tokens": 30, "temperature": 1.0,
                "top_p": 0.9, "seed": seed, "logprobs": 0} for seed in (1234, 99)]
    paths = ["/v1/chat/completions"] * 6 + ["/v1/completions"] * 2
    alone = [_post(url, p, b) for p, b in zip(paths, bodies)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda pb: _post(url, *pb), zip(paths, bodies)))
    for (status_a, a), (status_t, t) in zip(alone, together):
        assert status_a == status_t == 200 and a["usage"] == t["usage"]
        (answer_a, lp_a), (answer_t, lp_t) = _answer(a), _answer(t)
        assert answer_a == answer_t
        np.testing.assert_allclose(lp_t, lp_a, atol=1e-4)
    assert len({_answer(a)[0][0][0] for _, a in alone}) == len(bodies)  # varied answers: not a trivial check


def test_seed_reproduces_a_temperature_1_answer(server):
    url, _ = server
    body = {"model": MODEL, "prompt": "Random words:", "max_tokens": 30, "temperature": 1.0, "seed": 7}
    first, second = (_post(url, "/v1/completions", body)[1] for _ in range(2))
    assert _answer(first)[0] == _answer(second)[0]
    other = _post(url, "/v1/completions", {**body, "seed": 8})[1]
    assert _answer(other)[0] != _answer(first)[0]


def test_n_choices_max_tokens_and_stop(server, client):
    url, _ = server
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=24, temperature=0).choices[0]
    assert full.finish_reason == "length"
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt="Hello", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full.text[:full.text.find(stop)]
    assert cut.usage.completion_tokens < 24
    chunks = _stream(url, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 24,
                                              "temperature": 0, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut.choices[0].text
    many = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 24
    assert len({c.text for c in many.choices}) == 3  # choice i draws with fold_in(key, i)
    one = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0, seed=5)
    assert one.choices[0].text == many.choices[0].text


def test_logprobs(server, client):
    url, _ = server
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.8, seed=3,
                                          logprobs=True)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    assert all(np.isfinite(c.logprob) and c.logprob <= 0 and isinstance(c.bytes, list) for c in content)
    _, done = _post(url, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 5, "temperature": 0,
                                             "logprobs": 0})
    lp = done["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 5
    assert all(np.isfinite(x) and x <= 0 for x in lp["token_logprobs"]) and lp["text_offset"][0] == 0
    status, err = _post(url, "/v1/completions", {"model": MODEL, "prompt": "Hi", "logprobs": 2})
    assert status == 400 and err["error"]["param"] == "logprobs"


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 300}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": -0.5}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "presence_penalty": 1}, 400, "presence_penalty"),
])
def test_bad_requests_are_refused_and_the_server_keeps_serving(server, path, body, status, param):
    url, _ = server
    got, err = _post(url, path, body)
    assert got == status and err["error"]["message"] and err["error"]["param"] == param
    if param == "prompt":
        assert str(CONTEXT) in err["error"]["message"] and re.search(r"\d{3} tokens", err["error"]["message"])
    ok, _ = _post(url, "/v1/completions", {"model": MODEL, "prompt": "still there?", "max_tokens": 2})
    assert ok == 200


def test_client_disconnect_mid_stream_frees_the_slots(server):
    url, _ = server
    before = _get(url, "/health")["cancelled"]
    streams = []
    for i in range(SLOTS):  # fill every slot with a long generation, read its first event, hang up
        conn, resp = _open_stream(url, "/v1/chat/completions", {**_chat_request(0), "max_tokens": 200,
                                                                 "temperature": 1.0, "top_p": 0.9})
        assert json.loads(next(_events(resp)))["choices"][0]["delta"]["role"] == "assistant"
        streams.append(conn)
    for conn in streams:
        conn.sock.shutdown(2)
        conn.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        health = _get(url, "/health")
        if health["busy_slots"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.05)
    assert health["busy_slots"] == 0 and health["cancelled"] - before == SLOTS
    start = time.time()
    status, body = _post(url, "/v1/completions", {"model": MODEL, "prompt": "after", "max_tokens": 4})
    assert status == 200 and body["usage"]["completion_tokens"] == 4 and time.time() - start < 30


def test_the_llm_judge_asks_the_live_server_and_eval_rows_record_its_verdict(server, client):
    """The LLM judge of `appo-jax eval --judge-url` against this server: its request is the chat completion the
    `openai` client gets for the same prompt at temperature 0; the tiny model's reply is no verdict, so the
    judgement fails with that reply saved in the answer row (`judge.failed`), and an unknown model is refused
    without retries."""
    from appo_jax.data.records import Record
    from appo_jax.evaluation.runner import answer_row
    from appo_jax.rewards.judge import JudgeError, make_judge
    from appo_jax.rollout.agent_loop import Rollout, RolloutRequest

    judge = make_judge("llm", url=server[0] + "/v1", model=MODEL, max_tokens=4, retries=0)
    prompt = judge.prompt("What is 2+2?", "4", ["4"])
    expected = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=4).choices[0].message.content
    with pytest.raises(JudgeError, match="not 'Correct' or 'Incorrect'") as err:
        judge.judge("What is 2+2?", "4", ["4"])
    assert err.value.raw == expected
    record = Record("q7", "What is 2+2?", ["4"], "gsm8k", "gsm8k", "math", [])
    request = RolloutRequest([1], None, meta={"item": record, "benchmark": "gsm8k", "local": 1})
    rollout = Rollout(0, request, np.zeros(3, np.int32), np.ones(3, bool), np.zeros(3, bool), np.zeros(3, np.float32),
                      np.zeros(3, np.float32), [], 2, "<answer>\\boxed{4}</answer>")
    row = answer_row(rollout, judge, "m", {})
    assert row["judge"]["name"] == f"llm:{MODEL}" and row["judge"]["failed"] and row["judge"]["verdict"] == expected
    assert row["metrics"]["correct"] is False and row["metrics"]["em"] == 1.0 and row["run"] == 1
    with pytest.raises(JudgeError, match=r"HTTP 4\d\d"):
        make_judge("llm", url=server[0] + "/v1", model="no-such-model", retries=2).judge("q", "a", ["a"])
