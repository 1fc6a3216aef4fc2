"""Near-duplicate images: 64-bit pHash within a Hamming distance, found by band indexing, never all pairs.

Split the 64 bits into ``m`` bands. If two hashes differ in at most ``r`` bits, some band differs in at
most ``r // m`` bits (pigeonhole). So every pair within ``r`` is found by looking up, for each hash and
band, the bucket of every band value within ``r // m`` bits of its own; candidates are then verified on all
64 bits. ``m = r + 1`` gives the classic exact-match bands (one lookup per band, but 5–6-bit buckets that
grow with n); fewer, wider bands cost more lookups but keep buckets tiny. ``plan_bands`` picks ``m`` by an
estimate of the work (lookups plus expected candidates), so the search stays near-linear as n grows, and
it is exact for every choice.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

HASH_BITS = 64
DEFAULT_THRESHOLD = 10
_CANDIDATE_CHUNK = 1 << 22  # candidate pairs verified at once (bounds memory)
_TABLE_BITS = 24
_DRAFT_SIDE = 128  # JPEGs are decoded at reduced size; pHash looks at 32x32 anyway


def phash64(image: bytes) -> int:
    """The 64-bit perceptual hash (imagehash.phash, 8x8 DCT bits) of encoded image bytes."""
    import imagehash

    with Image.open(io.BytesIO(image)) as img:
        if img.format == "JPEG":
            img.draft("L", (_DRAFT_SIDE, _DRAFT_SIDE))
        bits = imagehash.phash(img.convert("L")).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    as_bytes = values.astype(np.uint64).view(np.uint8).reshape(-1, 8)
    return np.unpackbits(as_bytes, axis=1).sum(axis=1)


def plan_bands(n: int, threshold: int) -> tuple[list[int], int]:
    """Band widths (summing to 64) and the per-band search radius that make the search cheapest."""
    n = max(n, 2)  # the cost of zero items is zero for every plan; plan for a pair instead
    best: tuple[float, list[int], int] | None = None
    for m in range(1, min(threshold + 1, HASH_BITS) + 1):
        widths = [HASH_BITS // m + (1 if i < HASH_BITS % m else 0) for i in range(m)]
        radius = threshold // m
        cost = sum(_probes(w, radius) * n * (1.0 + n / 2.0**w) for w in widths)
        if best is None or cost < best[0]:
            best = (cost, widths, radius)
    assert best is not None
    return best[1], best[2]


def _probes(width: int, radius: int) -> int:
    return sum(math.comb(width, k) for k in range(radius + 1))


def _xor_masks(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit value with at most ``radius`` bits set."""
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


def near_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """All index pairs ``(i, j)``, ``i < j``, whose hashes differ in at most ``threshold`` bits."""
    values = np.asarray(hashes, dtype=np.uint64)
    if len(values) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    widths, radius = plan_bands(len(values), threshold)
    found, shift = [], 0
    for width in widths:
        band = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        shift += width
        order = np.argsort(band, kind="stable")
        bounds = _bucket_bounds(band[order], width)
        for mask in _xor_masks(width, radius):
            for i, j in _bucket_candidates(bounds, order, band ^ mask):
                close = (i < j) & (popcount(values[i] ^ values[j]) <= threshold)
                found.append(np.stack([i[close], j[close]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found), axis=0)


class BandIndex:
    """Hashes indexed by bands once, then queried in batches: every (query, item) pair within
    ``threshold`` bits. ``near_pairs``'s search with the two sides apart, for a small fixed set (an eval
    set's hashes) probed by many batches (training shards); exact, like ``near_pairs``."""

    def __init__(self, hashes: np.ndarray, threshold: int) -> None:
        self.values = np.asarray(hashes, dtype=np.uint64)
        self.threshold = threshold
        widths, radius = plan_bands(len(self.values), threshold)
        self.bands, shift = [], 0
        for width in widths:
            band = (self.values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            order = np.argsort(band, kind="stable")
            bounds = _bucket_bounds(band[order], width)
            self.bands.append((shift, width, order, bounds, _xor_masks(width, radius)))
            shift += width

    def query(self, queries: np.ndarray) -> np.ndarray:
        """``(query index, item index)`` pairs within the threshold, sorted, each once."""
        values = np.asarray(queries, dtype=np.uint64)
        found = [np.zeros((0, 2), dtype=np.int64)]
        for shift, width, order, bounds, masks in self.bands:
            band = (values >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            for mask in masks:
                for i, j in _bucket_candidates(bounds, order, band ^ mask):
                    close = popcount(values[i] ^ self.values[j]) <= self.threshold
                    found.append(np.stack([i[close], j[close]], axis=1))
        return np.unique(np.concatenate(found), axis=0)


def _bucket_bounds(sorted_band: np.ndarray, width: int) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """A function from band values to their (start, stop) in ``sorted_band``.

    Up to 2^24 values it is a lookup table (one gather per query instead of a binary search, several
    times faster); wider bands fall back to searchsorted.
    """
    if width <= _TABLE_BITS:
        starts = np.searchsorted(sorted_band, np.arange(2**width + 1, dtype=np.uint64))
        return lambda q: (starts[q], starts[q + np.uint64(1)])
    return lambda q: (np.searchsorted(sorted_band, q, "left"), np.searchsorted(sorted_band, q, "right"))


def _bucket_candidates(
    bounds: Callable[[np.ndarray], tuple[np.ndarray, ...]], order: np.ndarray, queries: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(query index, item index) pairs whose band equals the query's value, in bounded chunks."""
    lo, hi = bounds(queries)
    counts = hi - lo
    cumulative = np.cumsum(counts)
    start = 0
    while start < len(queries):
        base = cumulative[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cumulative, base + _CANDIDATE_CHUNK, side="right")))
        part = slice(start, stop)
        n = counts[part]
        query = np.repeat(np.arange(start, stop), n)
        offsets = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        yield query, order[np.repeat(lo[part], n) + offsets]
        start = stop


def perceptual_edges(hashes: np.ndarray, threshold: int = DEFAULT_THRESHOLD) -> np.ndarray:
    """Duplicate edges between items: equal hashes chain to their first item, near ones pair up.

    Identical hashes are collapsed first, so a bucket of many equal hashes never costs its square.
    """
    values = np.asarray(hashes, dtype=np.uint64)
    unique, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    same = np.stack([np.arange(len(values)), first[inverse.ravel()]], axis=1)
    near = first[near_pairs(unique, threshold)]
    return np.concatenate([same[same[:, 0] != same[:, 1]], near.reshape(-1, 2)])
