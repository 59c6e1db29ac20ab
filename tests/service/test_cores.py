"""The cores that concurrent CPU passes share out (service/cores.py)."""

from __future__ import annotations

import threading

import pytest

from service.cores import CoreShare


def claim_on_thread(share: CoreShare, got: list[int], hold: threading.Event, held: threading.Event) -> threading.Thread:
    """A thread that claims a share, reports its count, and holds the claim until ``hold`` is set."""

    def run() -> None:
        with share.claim() as n:
            got.append(n)
            held.set()
            hold.wait(10)

    t = threading.Thread(target=run)
    t.start()
    assert held.wait(10)
    return t


def test_a_pass_alone_gets_every_core_and_the_next_ones_what_is_left():
    share = CoreShare(4)
    with share.claim() as alone:
        assert alone == 4 and share.running == 1
    got: list[int] = []
    hold = threading.Event()
    threads = [claim_on_thread(share, got, hold, threading.Event()) for _ in range(3)]
    assert got == [4, 2, 1] and share.running == 3  # each takes its share when it starts
    with share.claim() as fourth:
        assert fourth == 1  # four passes on four cores
    hold.set()
    for t in threads:
        t.join()
    assert share.running == 0
    with share.claim() as again:
        assert again == 4


def test_never_less_than_one_thread():
    share = CoreShare(2)
    got: list[int] = []
    hold = threading.Event()
    threads = [claim_on_thread(share, got, hold, threading.Event()) for _ in range(3)]
    assert got == [2, 1, 1]
    hold.set()
    for t in threads:
        t.join()


def test_a_pass_inside_another_on_the_same_thread_takes_no_share_of_its_own():
    share = CoreShare(2)
    got: list[int] = []
    hold = threading.Event()
    other = claim_on_thread(share, got, hold, threading.Event())
    with share.claim() as outer:
        with share.claim() as inner:  # another model's turn between a generation's pixels
            assert outer == inner == 1 and share.running == 2
        assert share.running == 2
    hold.set()
    other.join()
    assert share.running == 0


def test_a_share_needs_a_core():
    with pytest.raises(ValueError, match="at least 1"):
        CoreShare(0)
