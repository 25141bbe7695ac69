"""Perceptual hashes and the near-duplicate pair search (multi-index against all pairs)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from tumorflow.bench.split import synthetic_phashes
from tumorflow.cli.main import main
from tumorflow.components.data.near_duplicates import hamming, near_duplicate_pairs, phash64


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


def _reference_pairs(hashes: np.ndarray, k: int) -> set[tuple[int, int]]:
    return {
        (i, j)
        for i, j in itertools.combinations(range(len(hashes)), 2)
        if hamming(int(hashes[i]), int(hashes[j])) <= k
    }


def _adversarial_hashes(k: int, seed: int) -> np.ndarray:
    """Many equal hashes, and neighbours at distance exactly k and k + 1 of them, where the
    flipped bits fall in every block of the index or all in one."""
    rng = np.random.default_rng(seed)
    centre = rng.integers(0, 2**64, dtype=np.uint64, endpoint=False)
    spread = [
        centre ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, d, replace=False)))
        for d in (k, k, k + 1, k + 1)
        for _ in range(6)
    ]
    contiguous = [
        centre ^ np.uint64(((1 << d) - 1) << shift)
        for d in (k, k + 1)
        for shift in (0, 20, 64 - max(d, 1))
    ]
    background = rng.integers(0, 2**64, size=40, dtype=np.uint64, endpoint=False)
    hashes = np.array([centre] * 30 + spread + contiguous, dtype=np.uint64)
    return np.concatenate([hashes, background])[rng.permutation(len(hashes) + 40)]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 8, 12])
def test_index_finds_exactly_the_all_pairs_pairs_in_the_same_order(k: int) -> None:
    rng = np.random.default_rng(k)
    clustered = synthetic_phashes(400, seed=k, max_flips=k + 1)
    hashes = np.concatenate(
        [
            clustered,
            _adversarial_hashes(k, k),
            rng.integers(0, 2**64, 100, dtype=np.uint64, endpoint=False),
        ]
    )
    index = near_duplicate_pairs(hashes, k, "index")
    reference = near_duplicate_pairs(hashes, k, "all-pairs")
    assert set(zip(*(a.tolist() for a in index), strict=True)) == _reference_pairs(hashes, k)
    assert all(np.array_equal(a, b) for a, b in zip(index, reference, strict=True))
    assert len(index[0]) > 30 * 29 // 2


def test_pairs_at_exactly_k_are_kept_and_at_k_plus_one_dropped() -> None:
    centre = np.uint64(0x0123_4567_89AB_CDEF)
    at_k = centre ^ np.uint64(0b1000_0000_0000_0001_0000_0000_0001)  # 3 bits, in three blocks
    beyond = centre ^ np.uint64(0b1111)  # 4 bits, one block
    firsts, seconds = near_duplicate_pairs(np.array([centre, at_k, beyond]), 3, "index")
    assert list(zip(firsts.tolist(), seconds.tolist(), strict=True)) == [(0, 1)]


def test_synthetic_phashes_hold_near_duplicate_clusters() -> None:
    hashes = synthetic_phashes(5000, seed=1)
    firsts, _ = near_duplicate_pairs(hashes, 5)
    assert len(np.unique(hashes)) > 4000
    assert len(firsts) > 1000


def test_bench_split_prints_both_methods_and_their_ratio(capsys) -> None:
    assert main(["bench", "split", "--sizes", "300", "2000", "--all-pairs-up-to", "300"]) == 0
    lines = capsys.readouterr().out.splitlines()
    small = next(line.split() for line in lines if line.split()[:1] == ["300"])
    large = next(line.split() for line in lines if line.split()[:1] == ["2000"])
    assert small[-1].endswith("x") and float(small[2]) > 0
    assert large[2] == "-" and int(large[1]) > 0
