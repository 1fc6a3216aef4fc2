"""MetaCLIP's balancing draw: keep a pair with the probability that caps every entry near ``t`` pairs.

An entry matched by ``count`` pairs of the whole pool has probability ``p = t / count`` when ``count > t``,
else 1 (a tail entry keeps all its pairs). A pair is kept when the draw of ANY entry it matches keeps it
(Algorithm 1: ``random() < p`` for each matched entry, keep on the first success), and a pair matching no
entry is dropped. So a head entry keeps about ``t`` pairs through its own draws, plus the pairs that other
entries' draws kept.

The draw of (uid, entry) is not a random stream but a hash of (seed, uid, entry) mapped to [0, 1): the
result depends on nothing but those three, so any split of the pool over processes, ranks or Ray tasks, and
any rerun, keeps exactly the same pairs. The uid half is blake2b keyed by the seed, the entry half blake2b of
the entry's text (so ids may change with the entries file and the draw does not), combined by splitmix64's
finaliser, whose top 53 bits make a uniform double.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data_tools.dedup.shuffle import mix64

_UNIT = 2.0**-53


def entry_probabilities(counts: np.ndarray, t: int) -> np.ndarray:
    """Each entry's keep probability: ``t / count`` above ``t``, else 1 (also for unmatched entries)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.where(counts > t, t / np.maximum(counts, 1.0), 1.0)


def uid_keys(uids: list[str], seed: int) -> np.ndarray:
    """The uid half of each draw's key: blake2b of the uid keyed by the seed."""
    key = seed.to_bytes(8, "little")
    digests = (hashlib.blake2b(uid.encode("utf-8"), digest_size=8, key=key).digest() for uid in uids)
    return np.fromiter((int.from_bytes(d, "little") for d in digests), dtype=np.uint64, count=len(uids))


def draws(uid_key: np.ndarray, entry_key: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) draws of (uid, entry) pairs, from the two halves of their keys."""
    mixed = mix64(mix64(uid_key) ^ entry_key)
    return (mixed >> np.uint64(11)).astype(np.float64) * _UNIT


def keep_rows(
    lengths: np.ndarray, entry_ids: np.ndarray, uid_key: np.ndarray, entry_key: np.ndarray, prob: np.ndarray
) -> np.ndarray:
    """Which rows (pairs) are kept: row ``i`` matched ``lengths[i] >= 1`` entries, listed row after row in
    ``entry_ids``; ``uid_key`` per row, ``entry_key`` and ``prob`` per entry id."""
    if len(lengths) == 0:
        return np.zeros(0, dtype=bool)
    row = np.repeat(np.arange(len(lengths)), lengths)
    success = draws(uid_key[row], entry_key[entry_ids]) < prob[entry_ids]
    return np.add.reduceat(success.astype(np.int64), _starts(lengths)) > 0


def expected_kept(lengths: np.ndarray, entry_ids: np.ndarray, prob: np.ndarray) -> float:
    """The expected number of kept rows: the sum over rows of ``1 - prod(1 - p)`` of their entries."""
    if len(lengths) == 0:
        return 0.0
    missed = np.multiply.reduceat(1.0 - prob[entry_ids], _starts(lengths))
    return float(np.sum(1.0 - missed))


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
