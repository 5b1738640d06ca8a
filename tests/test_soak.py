"""The soak test (``loadtests/soak.py``): how it judges requests around a gateway restart, and a
short run of the real thing — server processes with a spare, SIGKILLs, a gateway SIGKILLed and
started again, streaming SDK clients, a fine-tuning job under kills — meeting every criterion."""

from __future__ import annotations

import pytest

from loadtests import soak
from loadtests.soak_clients import Outcome, Prompt
from loadtests.soak_report import Restart, classify

PROMPTS = [Prompt("chat", "hi", "hello there", 3)]


def test_only_errors_of_requests_at_the_gateway_restart_are_forgiven():
    restart = Restart(killed=100.0, ready=130.0)
    outcomes = [
        Outcome(0, 10, 20, "ok"),
        Outcome(0, 10, 20, "wrong", "'hi' != 'hello there'"),
        Outcome(0, 90, 100.5, "error", "APIConnectionError: Connection error."),  # in flight at the kill
        Outcome(0, 110, 110.1, "error", "APIConnectionError: Connection error."),  # sent while it was down
        Outcome(0, 90, 99, "error", "HTTP 503: blocks 0-4 are not served"),  # before the kill: lost
        Outcome(0, 131, 132, "error", "HTTP 429: too many requests"),  # after the restart: lost
        Outcome(0, 90, 270, "hang", "no end within 180 s"),  # in flight, but hanging: lost all the same
        Outcome(0, 95, 101, "truncated", "'hel'"),  # cut without an error: lost
        Outcome(0, 140, 150, "ok"),
    ]
    counts = classify(outcomes, PROMPTS, restart)
    assert (counts.ok, counts.ok_after_restart, counts.tokens, counts.wrong) == (2, 1, 6, 1)
    assert (counts.in_flight_at_restart, counts.refused_while_down, counts.lost) == (1, 1, 4)
    assert counts.total == len(outcomes)
    assert classify(outcomes[2:4], PROMPTS, None).lost == 2  # no restart: no error is forgiven


@pytest.mark.e2e
@pytest.mark.slow
def test_a_short_soak_meets_every_criterion(tmp_path):
    args = soak.parse_args([
        "--minutes", "0.5", "--streams", "4", "--spans", "1", "--per-span", "2", "--max-tokens", "8",
        "--kill-every", "4", "8", "--restart-after", "1", "--ft-epochs", "4", "--ft-kill-every", "0.3", "1",
        "--warmup", "5", "--rss-interval", "1", "--settle", "20", "--out", str(tmp_path),
    ])
    report = soak.run(args)
    assert report.failures() == [], report.table()
    requests = report.requests
    assert requests.ok > 0 and requests.ok_after_restart > 0 and requests.wrong == requests.lost == 0
    assert report.restart is not None and report.chaos.kills >= 1
    assert report.chaos.restarts == report.chaos.kills and not report.chaos.restart_failures
    # a server died while the job trained (8 steps take seconds even on a fast machine; the first
    # kill comes within 1 s of the job's start)
    assert report.fine_tune is not None and report.fine_tune[2] >= 1
    assert any(g.growth is not None and g.label.startswith("gateway") for g in report.memory)
    assert (tmp_path / "rss.csv").read_text().count("\n") > 10
