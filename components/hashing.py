"""Perceptual hashes and the fast search for near-duplicate pairs among them.

A 64-bit pHash (imagehash.phash) per image, stored as uint64. Pairs at Hamming distance
<= k are found block by block with a vectorised XOR + popcount over the whole array, so 12,446
hashes (about 77 million pairs) take well under a few seconds instead of a Python double loop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Rows of the pairwise distance matrix computed at once (memory: rows * n * 8 bytes).
_BLOCK_ROWS = 512


def phash64(image: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of an image, as an unsigned integer."""
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return (int(a) ^ int(b)).bit_count()


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) whose hashes differ in at most `max_distance` bits."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
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
    return np.concatenate(firsts), np.concatenate(seconds)
