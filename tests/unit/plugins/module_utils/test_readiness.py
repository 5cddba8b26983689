"""Readiness: which answers mean the app is up, the probe URL, the one wait and the agent's own error."""
from __future__ import annotations

import pytest

from ansible_collections.hpc.interactive.plugins.module_utils import _readiness as R


@pytest.mark.parametrize("status,ok", [(200, True), (302, True), (401, True), (403, True), (404, False),
                                       (500, False), (502, False), (None, False)])
def test_ready_status(status, ok):
    assert R.ready_status(status) is ok


def test_probe_url():
    assert R.probe_url(23456, "/me", "api/status") == "http://127.0.0.1:23456/me/23456/api/status"
    assert R.probe_url(23456, "/sme") == "https://127.0.0.1:23456/sme/23456/"
    for port, url, probe in ((0, "/me", ""), (23456, "/x", ""), (23456, "/me", "/abs"), (1, "/me", "../x")):
        with pytest.raises(R.ReadinessError):
            R.probe_url(port, url, probe)


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = []

    def clock(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_wait_ready_polls_until_ready():
    clk = FakeClock()
    answers = iter([(None, "refused"), (502, ""), (200, "")])
    ready, status, elapsed, msg = R.wait_ready(lambda: next(answers), 10, interval=0.2, clock=clk.clock,
                                               sleep=clk.sleep)
    assert (ready, status, msg) == (True, 200, "") and elapsed == pytest.approx(0.4) and clk.sleeps == [0.2, 0.2]


def test_wait_ready_times_out_with_words():
    clk = FakeClock()
    ready, status, elapsed, msg = R.wait_ready(lambda: (502, ""), 1, interval=0.3, clock=clk.clock, sleep=clk.sleep)
    assert not ready and status == 502 and elapsed == pytest.approx(1.0)
    assert msg == "no answer from the server after 1 s (last answer HTTP 502)"


def test_wait_ready_aborts_at_once():
    clk = FakeClock()
    calls = []
    ready, _unused1, _unused2, msg = R.wait_ready(
        lambda: (None, "refused"), 300, clock=clk.clock, sleep=clk.sleep,
        abort=lambda: calls.append(1) or (None if len(calls) < 3 else "cancelled"))
    assert not ready and msg == "cancelled" and len(calls) == 3 and clk.t < 1


def test_agent_error(tmp_path):
    assert R.agent_error(str(tmp_path)) is None
    (tmp_path / "agent.error").write_text("nginx not found on compute1\nmore\n")
    assert R.agent_error(str(tmp_path)) == "nginx not found on compute1"
