"""The slot transport on its own: memfd slots, in-place read-only views, credits, regrowth, EOF."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edge_runtime.chain.node import Node
from edge_runtime.chain.slots import HEADER_BYTES, PAGE, Channel, PeerGone, SlotError
from edgemart.core.errors import UsageError


def _pair(slots: int = 2) -> tuple[Node, Node]:
    to_consumer, to_producer = Channel.pair("producer", "consumer")
    producer = Node("producer", {"consumer": to_consumer}, {"t": ["consumer"]}, {}, slots)
    consumer = Node("consumer", {"producer": to_producer}, {}, {"t": "producer"}, slots)
    return producer, consumer


def test_views_are_in_place_read_only_and_credited() -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    producer, consumer = _pair()
    a = np.arange(1000, dtype=np.float32).reshape(10, 100)
    producer.publish("t", 0, a)
    producer.publish("t", 1, a * 2)
    assert not producer.can_publish("t", 2)  # both slots held: the producer must wait
    consumer.pump(1.0)
    view = consumer.view("t", 0)
    assert np.array_equal(view, a) and not view.flags.writeable and not view.flags.owndata
    # The payload starts on a page boundary of the mapping (HEADER_BYTES is a whole page).
    assert HEADER_BYTES % PAGE == 0 and view.ctypes.data % PAGE == 0
    del view
    consumer.release("t", 0)
    producer.pump(1.0)
    assert producer.can_publish("t", 2) and not producer.can_publish("t", 3)
    # A bigger tensor regrows the slot: a new memfd travels with the ready message.
    big = np.ones((3, 5000), dtype=np.int64)
    producer.publish("t", 2, big)
    consumer.pump(1.0)
    assert np.array_equal(consumer.view("t", 2), big) and np.array_equal(consumer.view("t", 1), a * 2)
    consumer.release("t", 1)
    consumer.release("t", 2)
    producer.close()
    consumer.close()
    assert set(os.listdir("/proc/self/fd")) == fds_before
    assert open("/proc/self/maps").read().count("edgemart-slot") == 0


def test_stale_frame_and_closed_peer_are_detected() -> None:
    producer, consumer = _pair()
    producer.publish("t", 0, np.zeros(4, np.float32))
    consumer.pump(1.0)
    consumer._announced[("t", 2)] = 0  # a message claiming frame 2 for a slot that holds frame 0
    with pytest.raises(SlotError, match="holds frame 0"):
        consumer.view("t", 2)
    producer.close()
    with pytest.raises(PeerGone):
        consumer.pump(1.0)
    consumer.close()


def test_channel_timeout() -> None:
    a, b = Channel.pair("x", "y")
    with pytest.raises(TimeoutError, match="no message from y"):
        a.recv(0.05)
    b.send({"t": "ping"})
    assert a.recv(1.0)[0] == {"t": "ping"}
    a.close()
    b.close()


def test_interrupt_during_a_slot_write_does_not_pin_the_mapping(monkeypatch) -> None:
    """Regression (intermittent SIGINT test failure in CI): a KeyboardInterrupt raised inside the copy left
    the slot's numpy view alive in the traceback's frame, so close() failed with BufferError and Ctrl-C
    turned into a crash with exit 1."""
    import edge_runtime.chain.slots as slots_mod

    slot = slots_mod.OwnedSlot("interrupt")
    slot.write(0, np.zeros(1024, np.float32))

    def interrupted_copy(*args, **kwargs):
        del args, kwargs  # like the C copy: the interrupt itself holds no reference to the arrays
        raise KeyboardInterrupt

    monkeypatch.setattr(slots_mod.np, "copyto", interrupted_copy)
    try:
        slot.write(1, np.ones(1024, np.float32))
    except KeyboardInterrupt:
        slot.close()  # the traceback (and its frames) is still alive here, as in the supervisor's handler
    else:
        raise AssertionError("the write was not interrupted")
    assert slot.fd == -1


def test_frame_messages_travel_as_structs_and_others_as_json() -> None:
    a, b = Channel.pair("x", "y")
    for message in (
        {"t": "ready", "k": "detect.boxes", "s": 1, "q": 7, "z": 8192},
        {"t": "released", "k": "detect.boxes", "s": 1, "q": 7},
        {"t": "done", "stage": "s", "q": 3, "ms": 1.5},
    ):
        a.send(message)
        assert b.recv(1.0)[0] == message
    a.sock.send(b"\x01short")  # a frame message cut short is a protocol error, not a crash
    with pytest.raises(SlotError, match="malformed control message"):
        b.recv(1.0)
    a.close()
    b.close()


def test_a_slot_header_naming_a_dtype_outside_the_list_is_refused() -> None:
    producer, consumer = _pair()
    producer.publish("t", 0, np.zeros(4, np.float32))
    slot = producer._owned["t"][0]
    assert slot._map is not None
    slot._map[24:40] = b"object".ljust(16, b"\0")  # the dtype field of the header
    consumer.pump(1.0)
    with pytest.raises(SlotError, match="corrupt"):
        consumer.view("t", 0)
    producer.close()
    consumer.close()


def test_a_corked_stage_run_reaches_each_peer_in_one_packet_in_order() -> None:
    a, b = Channel.pair("a", "b")
    a.corked = True
    a.send({"t": "ready", "k": "det.boxes", "s": 0, "q": 7})
    a.send({"t": "released", "k": "image", "s": 1, "q": 7})
    b.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.sock.recv(16)  # nothing on the wire while corked
    a.send({"t": "ready", "k": "det.scores", "s": 0, "q": 7, "z": 4096}, [os.dup(0)])  # fds flush first
    a.send({"t": "ready", "k": "det.more", "s": 0, "q": 7})
    a.corked = False
    a.flush()
    got = []
    for _ in range(4):
        message, fds = b.recv(1.0)
        got.append((message["t"], message["k"], bool(fds)))
        for fd in fds:
            os.close(fd)
    assert got == [
        ("ready", "det.boxes", False),
        ("released", "image", False),
        ("ready", "det.scores", True),
        ("ready", "det.more", False),
    ]
    with pytest.raises(TimeoutError):
        b.recv(0.05)
    # Three plain frame messages sent while corked leave as one batch packet (kind 3), nothing after it.
    a.corked = True
    for q in range(3):
        a.send({"t": "released", "k": "x", "s": 0, "q": q})
    a.flush()
    packet = b.sock.recv(65536)
    assert packet[0] == 3 and packet.count(b"x") == 3 and b.recv_nowait() is None


def test_a_malformed_batch_is_a_slot_error() -> None:
    a, b = Channel.pair("a", "b")
    a.sock.send(bytes([3]) + (200).to_bytes(2, "little") + b"\x01short")
    with pytest.raises(SlotError, match="malformed"):
        b.recv(1.0)
    a.sock.send(bytes([3]))
    with pytest.raises(SlotError, match="malformed"):
        b.recv(1.0)


def test_a_producer_computes_straight_into_its_slot() -> None:
    """reserve() hands the producer a writable view of the slot itself (what a model writes its output
    into); commit() announces it. The consumer reads those very bytes; a held slot cannot be reserved."""
    producer, consumer = _pair()
    target = producer.reserve("t", 0, (4, 250), "float32")
    assert target.flags.writeable and target.shape == (4, 250)
    np.multiply(np.arange(1000, dtype=np.float32).reshape(4, 250), 3, out=target)  # computed in place
    producer.commit("t", 0, target)
    del target
    consumer.pump(1.0)
    assert np.array_equal(consumer.view("t", 0), np.arange(1000, dtype=np.float32).reshape(4, 250) * 3)
    # Growing: a bigger reservation takes a new memfd, which travels with the ready message.
    big = producer.reserve("t", 1, (3, 5000), "int64")
    big[...] = 7
    producer.commit("t", 1, big)
    del big
    consumer.pump(1.0)
    assert (consumer.view("t", 1) == 7).all() and consumer.view("t", 1).shape == (3, 5000)
    with pytest.raises(SlotError, match="still held"):
        producer.reserve("t", 2, (1,), "float32")  # frame 0's slot: the consumer still holds it
    consumer.release("t", 0)
    producer.pump(1.0)
    with pytest.raises(UsageError, match="cannot travel through a slot"):
        producer.reserve("t", 2, (1,), "complex64")
    consumer.release("t", 1)
    producer.close()
    consumer.close()
