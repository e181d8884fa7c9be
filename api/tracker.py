"""A change tracker: what changed per key since the last sync, coalesced.

kube-proxy's ServiceChangeTracker made generic. Informer handlers `record(key,
old, new)` (usually after mapping objects to just what the sync needs, so
irrelevant changes compare equal and vanish); the sync `take()`s the pending
pairs. Changes to one key between two syncs collapse to the first old and the
last new value: A->B->C is A->C, and a change that ends where it started
(add then delete, A->B->A) is dropped.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ChangeTracker(Generic[K, V]):
    def __init__(self, equal: Callable[[V | None, V | None], bool] = operator.eq) -> None:
        self._equal = equal
        self._pending: dict[K, tuple[V | None, V | None]] = {}
        self.recorded = 0  # changes recorded (before coalescing), for metrics

    def record(self, key: K, old: V | None, new: V | None) -> bool:
        """Note that `key` went from `old` to `new`; True if a change is pending for it."""
        self.recorded += 1
        first = self._pending[key][0] if key in self._pending else old
        if self._equal(first, new):
            self._pending.pop(key, None)
            return False
        self._pending[key] = (first, new)
        return True

    def take(self) -> dict[K, tuple[V | None, V | None]]:
        """The pending (old, new) pairs by key; the tracker is empty afterwards."""
        out, self._pending = self._pending, {}
        return out

    def clear(self) -> None:
        self._pending = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def __contains__(self, key: object) -> bool:
        return key in self._pending
