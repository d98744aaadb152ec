"""A reward server over HTTP, as OpenRLHF's ``--remote_rm_url`` and veRL's reward servers are used.

Protocol: ``POST <url>`` with the JSON body ``{"prompts": [...], "completions": [...]}`` (one entry per row, at most
``batch_size`` rows per request); the answer is ``{"scores": [...]}`` with one finite number per row, in order.

Connection errors, timeouts and HTTP 5xx are retried ``retries`` times, waiting ``backoff_s * 2**k`` seconds
before retry ``k`` (0.5 s, 1 s, 2 s, ... by default); a 4xx is the request's fault and is not retried. Every
failure is one RemoteRewardError line that starts with the config key and names the URL. Standard library only.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.request

from rlhf.rewards.functions import RewardFunctionError

BACKOFF_S = 0.5
"""Seconds before the first retry; each further retry waits twice as long."""

_sleep = time.sleep  # the wait between attempts (tests replace it to record the backoff)


class RemoteRewardError(RewardFunctionError):
    """A reward server could not be reached or answered something unusable. One line: the config key, the URL."""


def _short(text: object, limit: int = 120) -> str:
    """``text`` on one line, at most ``limit`` characters (server text may hold newlines or a whole page)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _parse(raw: bytes, n: int, first: int, where: str) -> list[float]:
    """The ``n`` scores of rows ``first .. first + n - 1`` from a response body, checked."""
    try:
        answer = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise RemoteRewardError(f"{where} answered invalid JSON ({_short(e)}): {_short(raw[:200])!r}") from None
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list):
        got = f"keys {sorted(answer)[:5]}" if isinstance(answer, dict) else type(answer).__name__
        raise RemoteRewardError(f'{where} answered JSON without a "scores" list ({got}); expected '
                                '{"scores": [one number per row]}')
    if len(scores) != n:
        raise RemoteRewardError(f"{where} answered {len(scores)} scores for {n} rows (rows {first}-{first + n - 1})")
    for i, x in enumerate(scores):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise RemoteRewardError(f"{where} answered a {type(x).__name__} score ({_short(repr(x), 40)}) for row "
                                    f"{first + i}; expected numbers")
        if not math.isfinite(x):
            raise RemoteRewardError(f"{where} answered a non-finite score ({x}) for row {first + i}")
    return [float(x) for x in scores]


def _post(url: str, prompts: list[str], completions: list[str], first: int, *, key: str, timeout_s: float,
          retries: int, backoff_s: float) -> list[float]:
    """One request of rows ``first ..``, retried on connection errors, timeouts and 5xx."""
    body = json.dumps({"prompts": prompts, "completions": completions}).encode()
    where = f"{key}: remote reward {url}"
    rows = f"rows {first}-{first + len(prompts) - 1}"
    attempts = retries + 1
    failure = ""
    for attempt in range(attempts):
        if attempt:
            _sleep(backoff_s * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            status = f"HTTP {e.code} ({_short(e.reason, 60)})"
            e.close()
            if 500 <= e.code < 600:
                failure = f"answered {status}"
                continue
            raise RemoteRewardError(f"{where} answered {status} for {rows}; not retried (only 5xx, timeouts and "
                                    'connection errors are): check the url and that the server takes {"prompts": '
                                    '[...], "completions": [...]}') from None
        except (TimeoutError, urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            if isinstance(reason, TimeoutError):
                failure = f"did not answer within {key}.timeout_s={timeout_s:g} s"
            else:
                failure = f"could not be reached ({type(reason).__name__}: {_short(reason, 80)})"
            continue
        return _parse(raw, len(prompts), first, where)
    raise RemoteRewardError(f"{where} {failure} on all {attempts} attempts ({key}.retries={retries}) for {rows}; "
                            "check the server" + (f" or raise {key}.timeout_s" if "timeout_s" in failure else ""))


def remote_scores(url: str, prompts: list[str], completions: list[str], *, key: str, batch_size: int = 64,
                  timeout_s: float = 30.0, retries: int = 3, backoff_s: float | None = None) -> list[float]:
    """``(N,)`` scores of N (prompt, completion) rows from the reward server at ``url``, ``batch_size`` rows per
    request, in row order. ``timeout_s`` bounds each attempt of each request; ``backoff_s`` None = BACKOFF_S (read
    at each call). ``key`` (``reward.sources[i]``) starts every error message."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    backoff_s = BACKOFF_S if backoff_s is None else backoff_s
    scores: list[float] = []
    for first in range(0, len(prompts), batch_size):
        scores += _post(url, list(prompts[first:first + batch_size]), list(completions[first:first + batch_size]),
                        first, key=key, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    return scores
