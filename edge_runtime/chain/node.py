"""One chain process's side of its hops: the slots it owns, the peer slots it has mapped, credits.

Used by the stage workers and by the supervisor alike. Frame n of a tensor goes to slot n % K;
a producer may reuse a slot only after every consumer process has released it."""

from __future__ import annotations

import selectors
from collections.abc import Iterable
from typing import Any

import numpy as np

from edge_runtime.chain.slots import Channel, MappedSlot, OwnedSlot, PeerGone, SlotError, check_dtype


class Node:
    """Slot bookkeeping for one process.

    `produces`: tensor key -> the peer processes that consume it from us.
    `consumes`: tensor key -> the peer process that produces it for us."""

    def __init__(
        self,
        name: str,
        hops: dict[str, Channel],
        produces: dict[str, list[str]],
        consumes: dict[str, str],
        slots: int,
        control: Iterable[Channel] = (),
    ) -> None:
        self.name = name
        self.hops = hops
        self.produces = produces
        self.consumes = consumes
        self.k = slots
        self._owned = {key: [OwnedSlot(f"{name}:{key}:{i}") for i in range(slots)] for key in produces}
        self._generation: dict[tuple[str, int], int] = {}
        self._sent_generation: dict[tuple[str, int, str], int] = {}
        self._busy: dict[tuple[str, int], set[str]] = {}
        self._maps: dict[tuple[str, int], MappedSlot] = {}
        self._announced: dict[tuple[str, int], int] = {}  # (key, seq) -> slot
        self.selector = selectors.DefaultSelector()
        self.control = list(control)
        for channel in [*hops.values(), *self.control]:
            self.selector.register(channel.sock, selectors.EVENT_READ, channel)

    def add_control(self, channel: Channel) -> None:
        self.control.append(channel)
        self.selector.register(channel.sock, selectors.EVENT_READ, channel)

    # --- batching ---------------------------------------------------------------------------

    def cork(self) -> None:
        """Hold this process's frame messages (ready, released) until uncork(): each peer then gets what one
        stage run says to it in one packet, so it wakes once per run instead of once per tensor."""
        for channel in self.hops.values():
            channel.corked = True

    def uncork(self) -> None:
        for channel in self.hops.values():
            channel.corked = False
            channel.flush()

    # --- producer side ---------------------------------------------------------------------

    def can_publish(self, key: str, seq: int) -> bool:
        return not self._busy.get((key, seq % self.k))

    def publish(self, key: str, seq: int, array: np.ndarray) -> None:
        """Copy `array` into our slot for frame `seq` and tell every consumer of `key`."""
        slot_index = self._free_slot(key, seq)
        slot = self._owned[key][slot_index]
        if slot.write(seq, array):
            self._regrown(key, slot_index)
        self._announce(key, seq, slot_index)

    def reserve(self, key: str, seq: int, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """A writable view of our slot for frame ``seq`` of ``key``: a producer computes the tensor straight
        into it (no copy), then calls commit(). The view must be dropped before the slot is used again."""
        slot_index = self._free_slot(key, seq)
        slot = self._owned[key][slot_index]
        dtype = np.dtype(check_dtype(np.dtype(dtype)))
        if slot.reserve(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize):
            self._regrown(key, slot_index)
        return slot.array(shape, dtype)

    def commit(self, key: str, seq: int, array: np.ndarray) -> None:
        """Frame ``seq`` of ``key`` is in the slot reserve() gave (``array``, that view): tell its consumers."""
        slot_index = self._free_slot(key, seq)
        self._owned[key][slot_index].seal(seq, array)
        self._announce(key, seq, slot_index)

    def _regrown(self, key: str, slot_index: int) -> None:
        """The slot took a new memfd: its next ready message carries the fd again (see _announce)."""
        self._generation[(key, slot_index)] = self._generation.get((key, slot_index), 0) + 1

    def _free_slot(self, key: str, seq: int) -> int:
        slot_index = seq % self.k
        if self._busy.get((key, slot_index)):
            raise SlotError(
                f"{key}: slot {slot_index} is still held by {sorted(self._busy[(key, slot_index)])}"
            )
        return slot_index

    def _announce(self, key: str, seq: int, slot_index: int) -> None:
        slot = self._owned[key][slot_index]
        generation = self._generation[(key, slot_index)]
        peers = self.produces[key]
        self._busy[(key, slot_index)] = set(peers)
        for peer in peers:
            message = {"t": "ready", "k": key, "s": slot_index, "q": seq}
            if self._sent_generation.get((key, slot_index, peer)) != generation:
                self._sent_generation[(key, slot_index, peer)] = generation
                message["z"] = slot.size
                self.hops[peer].send(message, [slot.fd])
            else:
                self.hops[peer].send(message)

    # --- consumer side ---------------------------------------------------------------------

    def has(self, key: str, seq: int) -> bool:
        return (key, seq) in self._announced

    def view(self, key: str, seq: int) -> np.ndarray:
        """The producer's tensor for frame `seq`, read in place (read-only, no copy)."""
        slot_index = self._announced[(key, seq)]
        return self._maps[(key, slot_index)].read(seq)

    def release(self, key: str, seq: int) -> None:
        slot_index = self._announced.pop((key, seq))
        self.hops[self.consumes[key]].send({"t": "released", "k": key, "s": slot_index, "q": seq})

    # --- message pump ----------------------------------------------------------------------

    def handle(self, channel: Channel, message: dict[str, Any], fds: list[int]) -> None:
        kind = message.get("t")
        if kind == "ready":
            key, slot_index, seq = message["k"], int(message["s"]), int(message["q"])
            if self.consumes.get(key) != channel.peer:
                raise SlotError(
                    f"{channel.peer} announced {key!r}, which it does not produce for {self.name}"
                )
            if fds:
                old = self._maps.pop((key, slot_index), None)
                if old is not None:
                    old.close()
                self._maps[(key, slot_index)] = MappedSlot(fds[0], int(message["z"]))
                for extra in fds[1:]:
                    _close_fd(extra)
            self._announced[(key, seq)] = slot_index
        elif kind == "released":
            key, slot_index = message["k"], int(message["s"])
            self._busy.get((key, slot_index), set()).discard(channel.peer)
        else:
            for fd in fds:
                _close_fd(fd)
            raise SlotError(f"unexpected message {kind!r} from {channel.peer}")

    def pump(self, timeout: float | None) -> list[tuple[Channel, dict[str, Any]]]:
        """Wait up to `timeout` for messages; handle hop messages and return control messages.

        Raises PeerGone when a peer closed its end of a hop or control channel."""
        others: list[tuple[Channel, dict[str, Any]]] = []
        for selector_key, _ in self.selector.select(timeout):
            channel: Channel = selector_key.data
            got: tuple[dict[str, Any], list[int]] | None = channel.recv(None)
            while got is not None:  # drain everything queued on this channel
                message, fds = got
                if channel in self.control:
                    for fd in fds:
                        _close_fd(fd)
                    others.append((channel, message))
                else:
                    self.handle(channel, message, fds)
                got = channel.recv_nowait()
        return others

    def close(self) -> None:
        for slots in self._owned.values():
            for slot in slots:
                slot.close()
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
        self._announced.clear()
        for channel in self.hops.values():
            channel.close()
        self.selector.close()


def _close_fd(fd: int) -> None:
    import os

    os.close(fd)


__all__ = ["Node", "PeerGone"]
