"""Perceptual hashes and the fast search for near-duplicate pairs among them.

A 64-bit pHash (imagehash.phash) per image, stored as uint64. Pairs at Hamming distance
<= k are found by multi-index hashing: the 64 bits are cut into m blocks, and by the pigeonhole
principle two hashes within k bits agree within floor(k/m) bits on at least one block, so only
hashes found by probing sorted block keys are compared. The work grows about linearly with the
number of hashes (1,000,000 in seconds); the quadratic all-pairs comparison (a vectorised XOR +
popcount, block of rows by block of rows) stays as the reference and for tiny inputs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Rows of the pairwise distance matrix computed at once (memory: rows * n * 8 bytes).
_BLOCK_ROWS = 512
# Most flip masks probed per block (beyond this the index is no faster than all pairs).
_MAX_PROBES = 4096
# Blocks up to this many bits are looked up in a table of bucket starts (2**bits entries).
_TABLE_BITS = 24


def phash64(image: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of an image, as an unsigned integer."""
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (int(a) ^ int(b)).bit_count()


def _all_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair compared, block of rows by block of rows: quadratic, the reference method."""
    firsts, seconds = [], []
    for start in range(0, len(hashes), _BLOCK_ROWS):
        block = hashes[start : start + _BLOCK_ROWS]
        distances = np.bitwise_count(block[:, None] ^ hashes[None, :])
        rows, cols = np.nonzero(distances <= max_distance)
        rows = rows + start
        keep = cols > rows
        firsts.append(rows[keep])
        seconds.append(cols[keep])
    if not firsts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)


@dataclass(frozen=True)
class _IndexPlan:
    """How the 64 bits are cut for multi-index hashing: `widths` of the blocks and the radius
    probed in each (pigeonhole: pairs within k bits agree within `radius` bits on some block)."""

    widths: tuple[int, ...]
    radius: int


def _plan(n: int, max_distance: int) -> tuple[_IndexPlan, float]:
    """The block cut with the fewest expected probes + candidates per hash for `n` uniform
    hashes, and that cost (all-pairs costs `n` per hash)."""
    best, best_cost = _IndexPlan((64,), max_distance), math.inf
    for blocks in range(1, min(max_distance + 1, 64) + 1):
        radius, width = max_distance // blocks, 64 // blocks
        probes = sum(math.comb(width, t) for t in range(radius + 1))
        cost = blocks * (probes + n * probes / 2.0**width)
        if probes <= _MAX_PROBES and cost < best_cost:
            extra = 64 - width * blocks
            widths = tuple(width + (1 if b < extra else 0) for b in range(blocks))
            best, best_cost = _IndexPlan(widths, radius), cost
    return best, best_cost


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every `width`-bit mask with at most `radius` bits set."""
    masks = [0]
    for count in range(1, radius + 1):
        masks += [
            sum(1 << bit for bit in bits) for bits in itertools.combinations(range(width), count)
        ]
    return np.array(masks, dtype=np.uint64)


def _expand_ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, position) for every position in each half-open range [start, stop)."""
    counts = stops - starts
    owners = np.repeat(np.arange(len(starts)), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return owners, np.repeat(starts, counts) + offsets


def _bucket_bounds(sorted_keys: np.ndarray, width: int):
    """A function from probe keys to the [start, stop) ranges of equal keys in `sorted_keys`: a
    lookup table of bucket starts for narrow blocks (a gather, several times faster than a binary
    search), else a binary search."""
    if width <= _TABLE_BITS:
        counts = np.bincount(sorted_keys.astype(np.int64), minlength=1 << width)
        table = np.concatenate([[0], np.cumsum(counts)])

        def lookup(probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            index = probe.astype(np.int64)
            return table[index], table[index + 1]

        return lookup

    def search(probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.searchsorted(sorted_keys, probe, side="left"),
            np.searchsorted(sorted_keys, probe, side="right"),
        )

    return search


def _multi_index_pairs(
    hashes: np.ndarray, max_distance: int, plan: _IndexPlan
) -> tuple[np.ndarray, np.ndarray]:
    """Near pairs found through sorted block indexes: each pair is taken from the first block on
    which it agrees within the radius, so no pair is found twice."""
    firsts, seconds = [], []
    shift = 0
    block_masks = []
    for width in plan.widths:
        block_masks.append(np.uint64(((1 << width) - 1) << shift))
        shift += width
    shift = 0
    for block, width in enumerate(plan.widths):
        keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        bounds = _bucket_bounds(keys[order], width)
        for flip in _flip_masks(width, plan.radius):
            starts, stops = bounds(keys ^ flip)
            owners, positions = _expand_ranges(starts, stops)
            partners = order[positions]
            keep = owners < partners
            owners, partners = owners[keep], partners[keep]
            difference = hashes[owners] ^ hashes[partners]
            keep = np.bitwise_count(difference) <= max_distance
            for earlier in block_masks[:block]:
                keep &= np.bitwise_count(difference & earlier) > plan.radius
            firsts.append(owners[keep])
            seconds.append(partners[keep])
        shift += width
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    order = np.lexsort((second, first))
    return first[order].astype(np.int64), second[order].astype(np.int64)


def near_duplicate_pairs(
    hashes: np.ndarray, max_distance: int, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) whose hashes differ in at most `max_distance` bits, sorted by i then j.

    `method`: "index" (multi-index hashing, about linear in the number of hashes), "all-pairs"
    (the quadratic reference) or "auto" (the index whenever it is expected to be cheaper). Both
    give exactly the same pairs.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    plan, cost = _plan(len(hashes), max_distance)
    if method == "all-pairs" or (method == "auto" and (cost >= len(hashes) or len(hashes) < 2)):
        return _all_pairs(hashes, max_distance)
    return _multi_index_pairs(hashes, max_distance, plan)
