"""Perceptual hashes and the vectorised near-duplicate pair search."""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image

from tumorflow.components.hashing import hamming, near_duplicate_pairs, phash64


def test_pair_search_matches_brute_force_across_blocks() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, size=300).astype(np.uint64)
    hashes = np.concatenate([base, base ^ flips, base[:400] ^ (flips * np.uint64(3))])
    firsts, seconds = near_duplicate_pairs(hashes, 2)
    expected = {
        (i, j)
        for i, j in itertools.combinations(range(len(hashes)), 2)
        if hamming(int(hashes[i]), int(hashes[j])) <= 2
    }
    assert set(zip(firsts.tolist(), seconds.tolist(), strict=True)) == expected
    assert len(expected) >= 300


def test_phash_is_stable_under_noise_and_differs_between_images() -> None:
    rng = np.random.default_rng(1)
    pixels = np.zeros((64, 64), dtype=np.float64)
    pixels[10:40, 8:30] = 200
    noisy = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255)
    other = np.zeros_like(pixels)
    other[30:60, 35:60] = 200

    def as_image(values: np.ndarray) -> Image.Image:
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")

    assert hamming(phash64(as_image(pixels)), phash64(as_image(noisy))) <= 4
    assert hamming(phash64(as_image(pixels)), phash64(as_image(other))) > 10
    assert 0 <= phash64(as_image(pixels)) < 2**64
