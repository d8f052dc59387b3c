"""LRU of finished encodings, so a repeated image (a reference used again and again,
a UI re-running a graph) or a repeated prompt costs no GPU time."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict


def image_key(data: bytes, focus, budget: int, role: str) -> str:
    h = hashlib.sha256(data)
    h.update(repr((focus, budget, role)).encode())
    return "image:" + h.hexdigest()


def prompt_key(prompt: str) -> str:
    return "prompt:" + hashlib.sha256(prompt.encode()).hexdigest()


class EncodingCache:
    """Keyed by content hashes; values are finished protobuf messages (unpadded)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
