"""The remote reward source (rlhf.rewards.remote): POST {"prompts", "completions"} -> {"scores"} to a reward server,
batched, retried with exponential backoff on connection errors, timeouts and 5xx (never on 4xx), and one-line errors
that start with the config key and name the URL.

Each test starts its own http.server on 127.0.0.1 port 0 in a thread; the fixture's finalizer wakes any handler still
sleeping and shuts the server down. Backoff bases are tiny (or the wait is recorded, not slept) to keep this fast.
"""

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import rlhf.rewards.remote as remote
from rlhf.config import validate_policy_config
from rlhf.rewards.functions import RewardFunctionError
from rlhf.rewards.remote import RemoteRewardError, remote_scores
from rlhf.rewards.sources import RemoteSource, RewardSources
from tests.conftest import FAST, compose_policy

MAX_REQUESTS = 20  # a test that sends more is broken: the server answers 400 (not retried) from then on
KEY = "reward.sources[0]"


class Server:
    """A scripted reward server. ``respond(i, body) -> (status, payload, delay_s)`` answers request ``i`` (from 0);
    ``payload`` is a JSON-able object or raw bytes. ``requests`` holds each parsed request body."""

    def __init__(self):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # set by the finalizer: wakes handlers that are still sleeping
        self.respond = lambda i, body: (200, {"scores": good_scores(body)}, 0.0)
        self.url = ""


def good_scores(body):
    """The correct server's score of a row: 100 * the prompt's number + the completion's length."""
    return [100.0 * int(p[1:]) + len(c) for p, c in zip(body["prompts"], body["completions"])]


@pytest.fixture
def server(request):
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                state.requests.append(body)
                i = len(state.requests) - 1
            status, payload, delay = (400, {"error": "too many requests"}, 0.0) if i >= MAX_REQUESTS \
                else state.respond(i, body)
            if delay:
                state.release.wait(delay)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.handle_error = lambda req, addr: None  # a client that timed out closed the socket: nothing to report
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def finish():
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)

    request.addfinalizer(finish)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/score"
    return state


def rows(n):
    """``n`` rows: prompts p0..p{n-1}, completions of length 0..n-1."""
    return [f"p{i}" for i in range(n)], ["x" * i for i in range(n)]


def call(server, n=3, **kw):
    kw = {"key": KEY, "batch_size": 64, "timeout_s": 5.0, "retries": 2, "backoff_s": 0.001, **kw}
    return remote_scores(server.url, *rows(n), **kw)


def test_batches_of_batch_size_rows_in_order(server):
    # 7 rows with batch_size=3: exactly 3 requests of 3, 3 and 1 rows, each with its rows' prompts and completions;
    # the scores come back in row order: row i is 100 * i + i = 101 * i (prompt p<i>, completion of length i).
    prompts, completions = rows(7)
    out = remote_scores(server.url, prompts, completions, key=KEY, batch_size=3, timeout_s=5.0, retries=0)
    assert out == [101.0 * i for i in range(7)]
    assert [len(b["prompts"]) for b in server.requests] == [3, 3, 1]
    assert [b["prompts"] for b in server.requests] == [prompts[0:3], prompts[3:6], prompts[6:7]]
    assert [b["completions"] for b in server.requests] == [completions[0:3], completions[3:6], completions[6:7]]


def test_no_rows_no_request(server):
    assert remote_scores(server.url, [], [], key=KEY) == [] and server.requests == []


def test_through_the_config_as_a_weighted_source(server, tmp_path):
    # reward.sources: a remote source (weight 2, batch_size 2) after a function source; 3 rows as a policy
    # tokenizer decodes them ("" , "x", "xx": see _Tokenizer). Remote scores 101 * i -> [0, 101, 202]; the function
    # scores 1 per row. Total = 1 + 2 * [0, 101, 202] = [1, 203, 405]; 2 requests (2 rows + 1 row).
    from tests.test_reward_sources import _Tokenizer

    cfg = compose_policy([*FAST, "reward.function=null", "reward.gold=null"], run_dir=str(tmp_path))
    cfg.reward.sources = [{"type": "function", "path": "tests.test_remote_reward.ones"},
                          {"type": "remote", "url": server.url, "weight": 2.0, "batch_size": 2, "name": "judge"}]
    sources = RewardSources.from_config(validate_policy_config(cfg), _Tokenizer())
    assert isinstance(sources["judge"], RemoteSource) and sources["judge"].key == "reward.sources[1]"
    ids = torch.ones(3, 2, dtype=torch.long)
    mask = torch.tensor([[0, 0], [1, 0], [1, 1]])
    total, by_source, _, completions = sources.score(["p0", "p1", "p2"], ids, mask, ids, mask)
    assert completions == ["", "x", "xx"]
    assert by_source["judge"].tolist() == [0.0, 101.0, 202.0] and total.tolist() == [1.0, 203.0, 405.0]
    assert [len(b["prompts"]) for b in server.requests] == [2, 1]


def ones(prompts, completions):
    return [1.0] * len(completions)


def test_a_500_then_success_is_retried(server):
    server.respond = lambda i, body: (500, {"error": "busy"}, 0.0) if i == 0 else (200, {"scores": good_scores(body)},
                                                                                   0.0)
    assert call(server, retries=2) == [0.0, 101.0, 202.0]
    assert len(server.requests) == 2  # the failed attempt and its retry


def test_always_500_fails_after_the_retries_naming_the_url(server):
    server.respond = lambda i, body: (500, {"error": "broken"}, 0.0)
    with pytest.raises(RemoteRewardError) as e:
        call(server, retries=2)
    assert str(e.value) == (f"{KEY}: remote reward {server.url} answered HTTP 500 (Internal Server Error) on all 3 "
                            f"attempts ({KEY}.retries=2) for rows 0-2; check the server")
    assert len(server.requests) == 3  # 1 + retries
    assert isinstance(e.value, RewardFunctionError)  # a user error: scripts print the one line and exit 2


def test_backoff_doubles_from_the_base(server, monkeypatch):
    # retries=3 with the default base 0.5 s: waits of 0.5, 1 and 2 s before retries 1, 2, 3 (recorded, not slept).
    waits = []
    monkeypatch.setattr(remote, "_sleep", waits.append)
    server.respond = lambda i, body: (503, {}, 0.0)
    with pytest.raises(RemoteRewardError, match="answered HTTP 503"):
        remote_scores(server.url, *rows(2), key=KEY, retries=3)
    assert waits == [0.5, 1.0, 2.0] and len(server.requests) == 4


def test_a_404_is_not_retried(server):
    server.respond = lambda i, body: (404, {"error": "no such route"}, 0.0)
    with pytest.raises(RemoteRewardError) as e:
        call(server, retries=3)
    msg = str(e.value)
    assert msg.startswith(f"{KEY}: remote reward {server.url} answered HTTP 404 (Not Found) for rows 0-2; not retried")
    assert len(server.requests) == 1 and "\n" not in msg


def test_a_server_slower_than_timeout_s_fails_naming_the_url_and_the_timeout(server):
    # Each attempt waits 0.2 s for an answer that would take 3 s; with retries=1 that is 2 attempts, about 0.4 s.
    server.respond = lambda i, body: (200, {"scores": good_scores(body)}, 3.0)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError) as e:
        call(server, timeout_s=0.2, retries=1)
    assert time.monotonic() - start < 2.5
    assert str(e.value) == (f"{KEY}: remote reward {server.url} did not answer within {KEY}.timeout_s=0.2 s on all 2 "
                            f"attempts ({KEY}.retries=1) for rows 0-2; check the server or raise {KEY}.timeout_s")
    assert len(server.requests) == 2


def test_an_unreachable_server_fails_after_the_retries():
    # A loopback port with nothing listening: connection refused at once, on each of 1 + 2 attempts.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RemoteRewardError) as e:
        remote_scores(url, *rows(2), key=KEY, retries=2, backoff_s=0.001)
    msg = str(e.value)
    assert msg.startswith(f"{KEY}: remote reward {url} could not be reached (ConnectionRefusedError: "), msg
    assert f"on all 3 attempts ({KEY}.retries=2) for rows 0-1; check the server" in msg and "\n" not in msg


@pytest.mark.parametrize("payload, fragment", [
    ({"scores": [1.0]}, "answered 1 scores for 3 rows (rows 0-2)"),
    ({"scores": [1.0, 2.0, 3.0, 4.0]}, "answered 4 scores for 3 rows (rows 0-2)"),
    ({"scores": [1.0, "good", 3.0]}, "answered a str score ('good') for row 1; expected numbers"),
    ({"scores": [1.0, 2.0, None]}, "answered a NoneType score (None) for row 2; expected numbers"),
    ({"scores": [True, 2.0, 3.0]}, "answered a bool score (True) for row 0; expected numbers"),
    ({"scores": [1.0, math.nan, 3.0]}, "answered a non-finite score (nan) for row 1"),
    ({"scores": [1.0, 2.0, -math.inf]}, "answered a non-finite score (-inf) for row 2"),
    ({"rewards": [1.0, 2.0, 3.0]}, "answered JSON without a \"scores\" list (keys ['rewards'])"),
    ([1.0, 2.0, 3.0], "answered JSON without a \"scores\" list (list)"),
    (b"<html>\nInternal\n</html>", "answered invalid JSON (Expecting value: line 1 column 1 (char 0))"),
])
def test_a_bad_answer_is_one_line_naming_the_key_and_the_url(server, payload, fragment):
    # JSON's NaN / -Infinity are parsed (Python's json accepts them) and refused as non-finite. Not retried: the
    # server answered, wrongly.
    server.respond = lambda i, body: (200, payload, 0.0)
    with pytest.raises(RemoteRewardError) as e:
        call(server, n=3, retries=2)
    msg = str(e.value)
    assert msg.startswith(f"{KEY}: remote reward {server.url} {fragment}"), msg
    assert "\n" not in msg and len(server.requests) == 1


def test_row_numbers_in_errors_count_across_batches(server):
    # batch_size=2, 5 rows: the second request (rows 2-3) answers one score too few.
    server.respond = lambda i, body: (200, {"scores": good_scores(body)[: 1 if i == 1 else None]}, 0.0)
    with pytest.raises(RemoteRewardError, match=r"answered 1 scores for 2 rows \(rows 2-3\)$"):
        call(server, n=5, batch_size=2)
    assert len(server.requests) == 2
