"""The judge under faults, against a loopback HTTP server this test controls: hangs, garbage,
server errors, repairable JSON, and how many requests it sees at once."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from k2rl.llm import ChatRequest, LLMClient, LLMFailure, ResponseCache, parse_json
from k2rl.rewards import Criterion, Episode, Rubric, RubricScorer

RUBRIC = Rubric(name="t", criteria=[Criterion(id="clarity", description="clear"),
                                    Criterion(id="grounded", description="grounded", weight=3)])
EPISODE = Episode(task="price of a mug", messages=[{"role": "assistant", "content": "It is $5."}])
GOOD = {"clarity": {"reason": "ok", "score": 4}, "grounded": {"reason": "ok", "score": 8}}


class FakeJudge(BaseHTTPRequestHandler):
    """POST /MODE/v1/chat/completions behaves per MODE; records requests and concurrency per MODE."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.path.strip("/").split("/")[0]
        with state["lock"]:
            state["requests"].append((mode, body))
            n = sum(m == mode for m, _ in state["requests"])
            state["in_flight"][mode] = state["in_flight"].get(mode, 0) + 1
            state["peak"][mode] = max(state["peak"].get(mode, 0), state["in_flight"][mode])
        try:
            self._answer(mode, n)
        finally:
            with state["lock"]:
                state["in_flight"][mode] -= 1

    def _answer(self, mode: str, n: int):
        if mode == "hang":
            self.server.state["stop"].wait(5)  # far past the client's timeout; bounded for teardown
            return self._content(json.dumps(GOOD))
        if mode == "garbage-body":
            return self._raw(200, b"<html>502 proxy says hi</html>")
        if mode == "garbage":
            return self._content("I think the answer is quite good, 10/10!")
        if mode == "repairable":  # fenced, trailing comma, cut off before the last brace
            return self._content('Verdict:\n```json\n{"clarity": {"reason": "fine", "score": 4},'
                                 ' "grounded": {"reason": "tool says $5", "score": 8},')
        if mode == "flaky":  # two server errors, then an answer
            return self._send(503, {"error": "overloaded"}) if n <= 2 else self._content(json.dumps(GOOD))
        if mode == "bad-request":
            return self._send(400, {"error": {"message": "model not found"}})
        if mode == "slow":
            time.sleep(0.2)
            return self._content(json.dumps(GOOD))
        raise AssertionError(mode)

    def _content(self, text: str):
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "fake-judge",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]})

    def _send(self, status: int, payload: dict):
        self._raw(status, json.dumps(payload).encode())

    def _raw(self, status: int, data: bytes):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): expected in the hang test


@pytest.fixture(scope="module")
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    server.daemon_threads = True
    server.state = {"lock": threading.Lock(), "requests": [], "in_flight": {}, "peak": {}, "stop": threading.Event()}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.state["stop"].set()
    server.shutdown()
    server.server_close()


def client(fake, mode, **kw):
    kw = {"timeout_s": 5.0, "retries": 2, "backoff_s": 0.01, **kw}
    return LLMClient(f"http://127.0.0.1:{fake.server_port}/{mode}/v1", **kw)


def scorer(backend, **kw):
    return RubricScorer(backend, RUBRIC, reason_chars=16, default_score=0.25, **kw)


def sent(fake, mode):
    return [body for m, body in fake.state["requests"] if m == mode]


def test_hang_times_out_retries_then_default_score(fake):
    backend = client(fake, "hang", timeout_s=0.3, retries=1)
    start = time.monotonic()
    batch = scorer(backend).score_groups([[EPISODE]])
    assert time.monotonic() - start < 3, "timeouts must bound the call"
    assert batch.scores[0][0].score == 0.25 and batch.scores[0][0].failed
    assert batch.failures == 1 and batch.metrics()["reward/judge_failures"] == 1
    stats = backend.stats.snapshot()
    assert stats["timeouts"] == 2 and stats["retries"] == 1 and stats["failures"] == 1
    assert len(sent(fake, "hang")) == 2


@pytest.mark.parametrize("mode", ["garbage", "garbage-body"])
def test_garbage_is_retried_then_default_score(fake, mode):
    backend = client(fake, mode)
    batch = scorer(backend).score_groups([[EPISODE, EPISODE]])
    assert [s.score for s in batch.scores[0]] == [0.25, 0.25] and batch.failures == 2
    stats = backend.stats.snapshot()
    assert stats["attempts"] == 6 and stats["failures"] == 2
    if mode == "garbage":
        assert stats["invalid"] == 6


def test_repairable_json_is_repaired(fake):
    backend = client(fake, "repairable")
    score = scorer(backend).score_groups([[EPISODE]]).scores[0][0]
    assert not score.failed
    assert score.criteria == {"clarity": 0.4, "grounded": 0.8}
    assert score.score == pytest.approx((0.4 * 1 + 0.8 * 3) / 4)
    assert backend.stats.snapshot()["repaired"] == 1


def test_server_errors_are_retried_with_backoff(fake):
    backend = client(fake, "flaky", backoff_s=0.1, retries=3)
    start = time.monotonic()
    result = backend.complete(ChatRequest([{"role": "user", "content": "hi"}]))
    assert json.loads(result.text) == GOOD and result.attempts == 3
    assert time.monotonic() - start >= 0.1 * (1 + 2) * 0.5  # backoff 0.1 then 0.2, jitter >= half
    assert backend.stats.snapshot()["retries"] == 2


def test_client_errors_fail_fast(fake):
    backend = client(fake, "bad-request", retries=3)
    with pytest.raises(LLMFailure) as err:
        backend.complete(ChatRequest([{"role": "user", "content": "hi"}]))
    assert err.value.kind == "http" and err.value.attempts == 1


def test_concurrency_limit_holds_and_is_used(fake):
    backend = client(fake, "slow", concurrency=3)
    requests = [ChatRequest([{"role": "user", "content": f"q{i}"}]) for i in range(9)]
    fake.state["peak"]["slow"] = 0
    results = backend.complete_many(requests)
    assert all(not isinstance(r, LLMFailure) for r in results)
    assert fake.state["peak"]["slow"] == 3 and backend.stats.peak_in_flight == 3


def test_structured_output_switch_and_model_discovery(fake):
    backend = client(fake, "slow", structured_output=False)
    scorer(backend).score_groups([[EPISODE]])
    body = sent(fake, "slow")[-1]
    assert body["model"] == "fake-judge" and "response_format" not in body
    backend = client(fake, "slow")
    scorer(backend).score_groups([[EPISODE]])
    schema = sent(fake, "slow")[-1]["response_format"]["json_schema"]["schema"]
    assert set(schema["required"]) == {"clarity", "grounded"} and "$defs" not in json.dumps(schema)


def test_disk_cache_survives_a_new_client(fake, tmp_path):
    first = client(fake, "slow", cache=ResponseCache(tmp_path))
    scorer(first).score_groups([[EPISODE]])
    before = len(sent(fake, "slow"))
    second = client(fake, "slow", cache=ResponseCache(tmp_path))
    batch = scorer(second).score_groups([[EPISODE]])
    assert batch.cache_hits == 1 and len(sent(fake, "slow")) == before
    assert batch.scores[0][0].criteria == {"clarity": 0.4, "grounded": 0.8}


@pytest.mark.parametrize("text,value", [
    ('{"a": "tab\there"}', {"a": "tab\there"}),  # raw control character: lenient, not a repair
    ('Sure! ```json\n{"a": [1, 2,],}\n```', {"a": [1, 2]}),
    ('{"a": {"b": "cut', {"a": {"b": "cut"}}),
    ('noise {"a": 1} trailing', {"a": 1}),
])
def test_lenient_parse(text, value):
    assert parse_json(text)[0] == value
