"""``duo-compile serve`` as users run it: a real server process on 127.0.0.1 (the bundled passkey model, eager
backend, CPU) driven by the official ``openai`` client and, where a status or header is the point, by httpx.

One server for the module (4 slots, 6 waiting at most, retrieval KV in pages of 16): completions and chat, streamed
and not, give the tokens ``engine.generate`` gives (an engine built here the same way, without paging); a passkey
prompt is answered; 16 clients at once are each answered or refused with 429; a stream closed early frees its slot
and pages; every bad input is a 400 naming the field; SIGTERM ends the process with status 0. Chat without a chat template runs on an in-process app; the
command's flags are checked before any work.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient

SLOTS, WAITING, MAX_LEN = 4, 6, 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(request):
    """A ``duo-compile serve`` process; the ``engine`` fixture is built while it starts (another core's work)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "duo_compile.cli", "serve", "--backend", "eager", "--port", str(port),
           "--max-num-seqs", str(SLOTS), "--max-waiting", str(WAITING), "--max-seq-len", str(MAX_LEN),
           "--token-budget", "512"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        request.getfixturevalue("engine")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stdout.read()}")
        time.sleep(0.3)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def engine():
    """The server's engine, built here the same way but without paging (the server pages its retrieval KV), for
    expected outputs."""
    from duo_compile.serve.server import bundled_engine

    return bundled_engine(backend="eager", max_seq_len=MAX_LEN, device="cpu", page_size=None)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="none", max_retries=0, timeout=120)


def _expected(engine, prompt_ids: list[int], new: int) -> list[int]:
    out = engine.generate(torch.tensor([prompt_ids]), max_new_tokens=new)
    return out[0, len(prompt_ids):].tolist()


def _health(url) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def _wait_idle(url, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        state = _health(url)
        if (state["running"], state["waiting"]) == (0, 0) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def _cancelled(url) -> float:
    """The /metrics count of cancelled requests."""
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith('duo_requests_finished_total{reason="cancelled"}'):
            return float(line.split()[-1])
    return 0.0


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["duo-passkey"]
    assert _health(server[1]) == {"status": "ok", "running": 0, "waiting": 0, "slots": SLOTS}


def test_completions_and_chat_equal_generate(client, engine):
    text = "the vault was quiet and the"
    ids = list(engine.tokenizer(text)["input_ids"])
    want = _expected(engine, ids, 12)
    out = client.completions.create(model="duo-passkey", prompt=text, max_tokens=12, temperature=0)
    assert out.choices[0].token_ids == want and out.choices[0].finish_reason == "length"
    assert out.choices[0].text == engine.tokenizer.decode(want, skip_special_tokens=True)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 12)
    by_ids = client.completions.create(model="duo-passkey", prompt=ids[1:] and ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].token_ids == want

    chat = client.chat.completions.create(model="duo-passkey", messages=[{"role": "user", "content": text}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == out.choices[0].text  # the bundled template: the message's text

    pieces, tokens = [], []
    for chunk in client.completions.create(model="duo-passkey", prompt=text, max_tokens=12, temperature=0,
                                           stream=True):
        pieces.append(chunk.choices[0].text)
        tokens += chunk.choices[0].token_ids
    assert tokens == want and "".join(pieces) == out.choices[0].text

    pieces, last = [], None
    for chunk in client.chat.completions.create(model="duo-passkey", messages=[{"role": "user", "content": text}],
                                                max_tokens=12, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            last = chunk.choices[0].finish_reason or last
        else:
            assert chunk.usage.completion_tokens == 12
    assert "".join(pieces) == out.choices[0].text and last == "length"


def test_stop_strings_and_seeded_sampling(client, engine):
    text = "the vault was quiet and the"
    full = client.completions.create(model="duo-passkey", prompt=text, max_tokens=12, temperature=0)
    word = full.choices[0].text.split()[3]
    cut = client.completions.create(model="duo-passkey", prompt=text, max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text[:full.choices[0].text.index(word)]
    a, b = (client.completions.create(model="duo-passkey", prompt=text, max_tokens=8, temperature=0.9, top_p=0.9,
                                      seed=7).choices[0].token_ids for _ in range(2))
    assert a == b


def test_passkey_is_answered(client, engine):
    from duo_compile.identify.passkey import PasskeyTask

    task = PasskeyTask.from_tokenizer(engine.tokenizer, num_passkeys=1, vocab_size=engine.info.vocab_size)
    sample = task.sample(np.random.default_rng(3), 1500, num_passkeys=1, passkey_length=4)
    start, end = sample.answer_spans[0]
    prompt = engine.tokenizer.decode(sample.input_ids[1:start].tolist())  # the tokenizer adds the BOS back
    assert list(engine.tokenizer(prompt)["input_ids"]) == sample.input_ids[:start].tolist()
    out = client.completions.create(model="duo-passkey", prompt=prompt, max_tokens=end - start, temperature=0)
    assert out.choices[0].token_ids == sample.input_ids[start:end].tolist()


def test_many_clients_at_once(server, client, engine):
    """16 clients, 4 slots, 6 waiting: each is answered with generate's tokens or refused with 429."""
    words = ["the", "vault", "was", "quiet", "and", "the", "key", "lay", "under", "a", "stone", "near", "the", "old", "gate"]
    prompts = [" ".join(words[i % 5: i % 5 + 4 + i % 7]) for i in range(16)]

    def ask(i):
        try:
            out = client.completions.create(model="duo-passkey", prompt=prompts[i], max_tokens=6, temperature=0)
            return out.choices[0].token_ids
        except openai.RateLimitError:
            return 429

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16), timeout=240))
    answered = [i for i, r in enumerate(results) if r != 429]
    assert len(answered) >= SLOTS
    for i in answered:
        assert results[i] == _expected(engine, list(engine.tokenizer(prompts[i])["input_ids"]), 6)
    assert _wait_idle(server[1])["running"] == 0


def test_overload_is_refused_with_429_and_a_closed_stream_frees_its_slot(server):
    url = server[1]
    body = {"model": "duo-passkey", "prompt": "the vault", "max_tokens": 3000, "temperature": 0, "stream": True}
    before = _cancelled(url)
    with httpx.Client(timeout=60) as http:
        streams = []
        for i in range(SLOTS + WAITING):  # every slot, then every waiting place taken
            response = http.send(http.build_request("POST", f"{url}/v1/completions", json=body), stream=True)
            assert response.status_code == 200
            streams.append(response)
            deadline = time.monotonic() + 30
            while i < SLOTS and _health(url)["running"] < i + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert _health(url) == {"status": "ok", "running": SLOTS, "waiting": WAITING, "slots": SLOTS}
        first = next(streams[0].iter_lines())  # a running request is streaming
        assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["token_ids"]
        refused = http.post(f"{url}/v1/completions", json=body)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        for response in streams:
            response.close()  # the client goes away mid-stream
    state = _wait_idle(url)
    assert (state["running"], state["waiting"]) == (0, 0)
    assert _cancelled(url) == before + SLOTS + WAITING
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("duo_requests_running", "duo_time_to_first_token_seconds_bucket", "duo_kv_cache_used_bytes",
                 "duo_inter_token_latency_seconds_bucket", "duo_generation_tokens_per_second", "duo_kv_pages_free"):
        assert name in metrics
    gauges = dict(line.split() for line in metrics.splitlines() if line.startswith("duo_kv_page"))
    # 4 slots of 4096 positions in pages of 16 (the default), every page free again once the requests ended
    assert float(gauges["duo_kv_page_size"]) == 16 and float(gauges["duo_kv_pages"]) == 4 * 4096 / 16
    assert float(gauges["duo_kv_pages_used"]) == 0 and float(gauges["duo_kv_pages_free"]) == 4 * 4096 / 16


def test_a_client_that_goes_away_cancels_its_request(server):
    """A non-streamed request whose client disconnects (here: gives up waiting) is cancelled; its slot is freed."""
    url = server[1]
    body = {"model": "duo-passkey", "prompt": "the vault", "max_tokens": 3000, "temperature": 0}
    before = _cancelled(url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=2))
    state = _wait_idle(url)
    assert (state["running"], state["waiting"]) == (0, 0) and _cancelled(url) == before + 1


BAD = {
    "unknown-field": ({"prompt": "a", "foo": 1}, "foo"),
    "n-2": ({"prompt": "a", "n": 2}, "n"),
    "too-long": ({"prompt": "a", "max_tokens": MAX_LEN}, "max_tokens"),
    "temperature": ({"prompt": "a", "temperature": -1}, "temperature"),
    "top-p": ({"prompt": "a", "top_p": 0}, "top_p"),
    "max-tokens-zero": ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    "token-outside-vocab": ({"prompt": [1, 99999]}, "prompt"),
    "empty-prompt": ({"prompt": ""}, "prompt"),
    "two-prompts": ({"prompt": ["a", "b"]}, "prompt"),
    "stop-empty": ({"prompt": "a", "stop": [""]}, "stop"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_400_naming_the_field(server, case):
    body, param = BAD[case]
    response = httpx.post(f"{server[1]}/v1/completions", json={"model": "duo-passkey", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_malformed_requests(server):
    url = server[1]
    bad_json = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "a",',
                          headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "duo-passkey", "messages": []})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    other = httpx.post(f"{url}/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert other.status_code == 404 and other.json()["error"]["param"] == "model"


def test_chat_without_a_template_is_a_400(engine):
    """In process (the ASGI app itself, on the reference engine): a tokenizer without a chat template."""
    import copy

    from duo_compile.serve.api import create_app
    from duo_compile.serve.memory import plan_kv

    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = None
    with TestClient(create_app(engine, plan_kv(engine, 1), model_name="m", tokenizer=tokenizer)) as http:
        response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]
        assert response.json()["error"]["param"] == "messages"
        ids = http.post("/v1/completions", json={"prompt": [1, 5, 6], "max_tokens": 4, "temperature": 0}).json()
    assert ids["choices"][0]["token_ids"] == _expected(engine, [1, 5, 6], 4)


def test_sigterm_finishes_and_exits_zero(server):
    proc, url = server
    body = {"model": "duo-passkey", "prompt": "the vault", "max_tokens": 20, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
        deadline = time.monotonic() + 30
        while _health(url)["running"] == 0 and not running.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        response = running.result()
    assert response.status_code == 200 and len(response.json()["choices"][0]["token_ids"]) == 20
    assert proc.wait(timeout=60) == 0


SERVE_ERRORS = {
    "port": (["--port", "-1"], "--port must be an integer >= 0, got -1"),
    "port-high": (["--port", "70000"], "--port must be an integer in 0..65535, got 70000"),
    "slots": (["--max-num-seqs", "0"], "--max-num-seqs must be an integer >= 1, got 0"),
    "page-size": (["--page-size", "-1"], "--page-size must be an integer >= 0, got -1"),
    "budget": (["--token-budget", "4"], "--token-budget must be an integer >= 8 (--max-num-seqs), got 4"),
    "fraction": (["--kv-cache-fraction", "1.5"], "--kv-cache-fraction must be a number in (0, 1], got 1.5"),
    "memory": (["--kv-cache-memory", "0"], "--kv-cache-memory must be a number of GiB > 0, got 0.0"),
    "both": (["--kv-cache-memory", "1", "--kv-cache-fraction", "0.5"], "give --kv-cache-memory or"),
    "masks-alone": (["--masks", "x.tsv"], "--masks needs a MODEL_DIR"),
    "no-model-dir": (["/nonexistent/model"], "model directory '/nonexistent/model' does not exist"),
}


@pytest.mark.parametrize("case", SERVE_ERRORS)
def test_serve_flags_are_checked_before_any_work(case, capsys, monkeypatch):
    from duo_compile import cli
    from duo_compile.serve import server

    monkeypatch.setattr(server, "bundled_engine", lambda **kw: pytest.fail("an engine was built"))
    flags, message = SERVE_ERRORS[case]
    assert cli.main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("duo-compile serve: error: ") and message in err and "\n" not in err
