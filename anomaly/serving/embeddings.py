"""SAM image embeddings made before the frame's boxes are known (EARLY_EMBEDDING), kept until they are.

SAM's image encoder needs only the image. With early embedding the ensemble calls the segmenter twice a frame:
once with the encoded image alone, in parallel with the detector, and once with the boxes. The first call
embeds the image and keeps the embedding here under a key it answers; the second brings the key back and
decodes its boxes from the kept embedding, so the encoder's run overlaps the detector's path instead of
following it. Both calls reach the same process (one segmenter instance), so the embedding never leaves the
card.

The store is small and forgets: it holds at most `capacity` embeddings (8 MB each for SAM2.1-L in bf16), a
key is taken once, and an embedding whose boxes never came (the frame failed in the detector) is dropped after
`max_age_s`. A key that is not found is no error: the boxes' call then embeds the image itself, as without
early embedding.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields

from anomaly.errors import InputError

log = logging.getLogger("anomaly.triton")


@dataclass
class StoreCounts:
    kept: int = 0  # embeddings made early and kept
    used: int = 0  # taken by their frame's boxes
    missed: int = 0  # keys asked for and not found (dropped, or never kept here)
    dropped: int = 0  # dropped unused after max_age_s
    declined: int = 0  # early calls answered without embedding (busy, full, tiled)
    refused: int = 0  # keys sent with another image than their own: gone, and the request refused


class RefusedKey(Exception):
    """EmbeddingStore.take: the item under the key was not the caller's (see `accept`)."""


class EmbeddingStore:
    """Embeddings under one-time keys. `reserve()` before the embedding is made (False: no room), then `put()`
    (consumes the reservation, returns the key) or `cancel()`; `take(key)` returns it once, or None."""

    def __init__(
        self,
        capacity: int,
        max_age_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        observe: Callable[[str], None] | None = None,
    ):
        self.capacity = max(1, int(capacity))
        self.max_age_s = max_age_s
        self.counts = StoreCounts()
        self._clock = clock
        self._observe = observe  # told each outcome counted (a StoreCounts field name): metrics
        self._items: dict[str, tuple[float, object]] = {}
        self._reserved = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def reserve(self) -> bool:
        with self._lock:
            self._drop_old()
            if len(self._items) + self._reserved >= self.capacity:
                return False
            self._reserved += 1
            return True

    def cancel(self) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    def put(self, embedding) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._reserved = max(0, self._reserved - 1)
            self._items[key] = (self._clock(), embedding)
            self._count("kept")
        return key

    def take(self, key: str, accept: Callable[[object], bool] | None = None):
        """The item kept under `key`, once, or None. `accept(item)` False: the item is gone all the same, counted
        as refused, and RefusedKey raised."""
        with self._lock:
            self._drop_old()
            found = self._items.pop(key, None)
            if found and accept is not None and not accept(found[1]):
                self._count("refused")
                raise RefusedKey(key)
            self._count("used" if found else "missed")
            return found[1] if found else None

    def decline(self) -> None:
        with self._lock:
            self._count("declined")

    def _count(self, outcome: str) -> None:
        setattr(self.counts, outcome, getattr(self.counts, outcome) + 1)
        if self._observe is not None:
            self._observe(outcome)

    def _drop_old(self) -> None:
        oldest = self._clock() - self.max_age_s
        for key in [k for k, (made, _) in self._items.items() if made < oldest]:
            del self._items[key]
            self._count("dropped")


def fingerprint(data: bytes) -> tuple[int, int]:
    """Which encoded image an embedding was made from: its length and CRC-32 (0.1 ms for a 400 kB JPEG here)."""
    return len(data), zlib.crc32(data)


@dataclass
class EarlyImage:
    """An image taken in to be embedded before its boxes come."""

    make_input: Callable[[], object]  # makes SAM's input when its batch is embedded
    hw: tuple[int, int]
    source: tuple[int, int]  # fingerprint() of its encoded bytes


@dataclass
class Kept:
    """An early embedding in the store, with the fingerprint of the image it was made from."""

    embedding: object
    source: tuple[int, int]


class EarlyEmbeddings:
    """A segmenter's early embeddings: which offers it takes (`offer`), embedding and keeping them (`embed`),
    and handing one back to its frame's boxes (`take`). An early call is never an error: whatever goes wrong
    leaves the frame to be embedded with its boxes, as without early embedding."""

    OUTCOMES = [f.name for f in fields(StoreCounts)]  # what the store counts, as metric labels

    def __init__(self, segmenter, capacity: int, observe: Callable[[str], None] | None = None):
        self.segmenter = segmenter
        self.store = EmbeddingStore(capacity, observe=observe)

    def offer(self, image_bytes: Callable[[], bytes], tiled: bool, idle: bool, max_bytes: int, max_pixels: int):
        """An EarlyImage to embed (decoded now), or None where it is declined: a tiled frame (SAM embeds windows
        around its boxes), SAM not idle (under load the frames' own calls keep it busy and batch as before), no
        room left, or an image that does not decode (its boxes' call meets it again and says what is wrong)."""
        if tiled or not idle or not self.store.reserve():
            self.store.decline()
            return None
        try:
            data = image_bytes()
            make_input, hw = self.segmenter.image_to_embed(data, max_bytes, max_pixels)
        except Exception as exc:  # noqa: BLE001 - declined; the frame is embedded with its boxes
            self.store.cancel()
            self.store.decline()
            log.info("segmenter: no early embedding (%s)", exc)
            return None
        return EarlyImage(make_input, hw, fingerprint(data))

    def embed(self, images: list[EarlyImage], max_batch: int) -> list[str]:
        """Embed the images (`max_batch` at a time) and keep each embedding: their keys, or "" for each where
        embedding failed."""
        if not images:
            return []
        try:
            made = self.segmenter.embed_images([(e.make_input, e.hw) for e in images], max_batch)
        except Exception:  # noqa: BLE001 - declined; the frames are embedded with their boxes
            log.exception("segmenter: early embedding failed; the frames are embedded with their boxes")
            for _ in images:
                self.store.cancel()
                self.store.decline()
            return [""] * len(images)
        return [self.store.put(Kept(embedding, image.source)) for embedding, image in zip(made, images)]

    def take(self, key: str, data: bytes | None = None):
        """The embedding kept under `key`, once; None (logged) where it is gone or was never kept here. `data`:
        the encoded image the caller sent with the key, if any, which must be the one the embedding was made
        from: another image's key (a client's mistake; the ensemble passes each frame its own) is refused, naming
        the input, rather than decoding its boxes from the wrong image."""
        source = fingerprint(data) if data is not None else None  # outside the store's lock
        try:
            kept = self.store.take(key, None if source is None else lambda k: k.source == source)
        except RefusedKey:
            raise InputError("KEPT_EMBEDDING", "is the key of another image than this request's ENCODED") from None
        if kept is None:
            log.info("segmenter: early embedding %s not kept (dropped, taken or never made): embedding now", key)
            return None
        return kept.embedding
