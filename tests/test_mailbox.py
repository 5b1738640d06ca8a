"""Batched wakeups between the gateway's threads (common/mailbox.py, used by swarm/bridge.py and
gateway/inference/head_rounds.py); the threads themselves carry every end-to-end test's generations."""

from __future__ import annotations

import pytest

from common.mailbox import Mailbox


def test_calls_made_while_a_delivery_is_pending_ride_along_with_it():
    posted: list = []
    mailbox = Mailbox(posted.append)
    ran: list[int] = []
    for index in range(3):
        mailbox.send(lambda index=index: ran.append(index))
    assert len(posted) == 1 and ran == []  # one wakeup for the burst
    posted.pop()()
    assert ran == [0, 1, 2]
    mailbox.send(lambda: ran.append(3))  # after a delivery, the next call posts again
    assert len(posted) == 1
    posted.pop()()
    assert ran == [0, 1, 2, 3]


def test_a_call_whose_posting_failed_is_not_run_by_a_later_delivery():
    posted: list = []

    def post(deliver) -> None:
        posted.append(deliver)
        if len(posted) == 1:
            raise RuntimeError("the loop is closed")

    ran: list[str] = []
    mailbox = Mailbox(post)
    with pytest.raises(RuntimeError):
        mailbox.send(lambda: ran.append("failed"))
    mailbox.send(lambda: ran.append("next"))  # posts again: nothing pending
    assert len(posted) == 2
    posted[-1]()
    assert ran == ["next"]


def test_a_failing_call_leaves_the_others_of_its_delivery_to_run():
    posted: list = []
    mailbox = Mailbox(posted.append)
    ran: list[str] = []

    def fails() -> None:
        raise ValueError("its own failure")

    mailbox.send(fails)
    mailbox.send(lambda: ran.append("after"))
    posted.pop()()
    assert ran == ["after"]
