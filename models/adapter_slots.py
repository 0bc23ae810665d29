"""Which LoRA adapters an engine serves and which of them sit in its device slots (host-side
bookkeeping, no JAX; the arrays live in the engine).

The device holds `slots` adapters at once, in slots 1..slots (slot 0 is the base: zeros). An
engine call needs each adapter its chunks name in a slot; one that is not resident is loaded
into a free slot, or into the least recently used one no chunk of the call needs. Every
registration gets a key of its own, never reused: the prefix pool caches a query's K/V under
(key, query), so K/V computed with an adapter's old weights, or with an adapter since removed,
are never read for another.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable


class AdapterSlots:
    def __init__(self, slots: int):
        self.slots = slots
        self._keys: dict[str, int] = {}  # registered name -> its key (>= 1; 0 is the base)
        self._next_key = 1
        # resident name -> slot, least recently used first
        self._resident: collections.OrderedDict[str, int] = collections.OrderedDict()

    def register(self, name: str) -> int:
        """A new (or replaced) adapter: a new key; its old weights leave their slot."""
        self._resident.pop(name, None)
        self._keys[name] = key = self._next_key
        self._next_key += 1
        return key

    def remove(self, name: str) -> None:
        self._keys.pop(name)
        self._resident.pop(name, None)

    def key(self, name: str) -> int:
        return self._keys[name]

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def names(self) -> list[str]:
        return list(self._keys)

    def resident(self) -> list[str]:
        return list(self._resident)

    def assign(self, names: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, int]]]:
        """A slot for each of `names` (registered, at most `slots` of them): {name: slot}, and
        the (name, slot) loads to do first (each evicting what the slot held)."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.slots:
            raise ValueError(f"{len(wanted)} adapters in one call; the device holds {self.slots}")
        loads = []
        for name in wanted:
            if name in self._resident:
                self._resident.move_to_end(name)
                continue
            used = set(self._resident.values())
            free = next((s for s in range(1, self.slots + 1) if s not in used), None)
            if free is None:
                victim = next(n for n in self._resident if n not in wanted)
                free = self._resident.pop(victim)
            self._resident[name] = free
            loads.append((name, free))
        return {name: self._resident[name] for name in wanted}, loads

    def drop(self, slot: int) -> None:
        """The slot's contents can no longer be trusted (its load failed)."""
        for name, s in list(self._resident.items()):
            if s == slot:
                del self._resident[name]
