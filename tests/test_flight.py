"""Single-flight and the worker gate, on their own."""

from __future__ import annotations

import threading
import time

import pytest

from imageguard.errors import InvalidImage, Overloaded
from imageguard.flight import ThreadFlights, ThreadGate


def test_leader_failure_reaches_every_follower() -> None:
    flights: ThreadFlights[int] = ThreadFlights()
    release = threading.Event()
    errors: list[BaseException] = []

    def leader() -> int:
        release.wait(5)
        raise InvalidImage("not_image")

    def call() -> None:
        try:
            flights.run("k", leader, timeout=10)
        except InvalidImage as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(errors) == 6 and {e.reason for e in errors} == {"not_image"}
    assert len(flights) == 0  # nothing left behind: the next call leads again
    assert flights.run("k", lambda: 7, timeout=1) == 7


def test_follower_timeout_is_503() -> None:
    flights: ThreadFlights[int] = ThreadFlights()
    release = threading.Event()
    leader = threading.Thread(target=lambda: flights.run("k", lambda: release.wait(5) and 1, timeout=1))
    leader.start()
    time.sleep(0.1)
    with pytest.raises(Overloaded) as info:
        flights.run("k", lambda: 2, timeout=0.05)
    assert info.value.reason == "fill_timeout" and info.value.retry_after == 1
    release.set()
    leader.join(5)


def test_gate_sheds_when_queue_full() -> None:
    gate = ThreadGate(workers=1, queue=0)
    inside = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with gate.slot():
            inside.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(5)
    with pytest.raises(Overloaded) as info, gate.slot():
        pass
    assert info.value.status == 503
    release.set()
    holder.join(5)
    with gate.slot():  # free again
        pass


def test_gate_queues_up_to_its_bound() -> None:
    gate = ThreadGate(workers=1, queue=1)
    release = threading.Event()
    order: list[str] = []

    def hold(name: str) -> None:
        with gate.slot():
            order.append(name)
            release.wait(5)

    first = threading.Thread(target=hold, args=("first",))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=hold, args=("second",))
    second.start()
    time.sleep(0.1)
    assert gate.waiting == 1
    with pytest.raises(Overloaded), gate.slot():
        pass
    release.set()
    first.join(5)
    second.join(5)
    assert order == ["first", "second"]
