"""`tumorflow bench split`: near-duplicate grouping, the all-pairs method against the index.

Both methods run on the same synthetic pHashes at each size; where both run, the pairs must be
identical (the command fails otherwise), and the table shows the time of each and the ratio.
The synthetic hashes look like an archive of scans: clusters of near-duplicates (neighbouring
slices and re-exports of one image, a few bits apart) over a uniform background of unrelated
images, so the search has real pairs to find.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tumorflow.components.data.near_duplicates import near_duplicate_pairs


def synthetic_phashes(
    n: int, seed: int = 0, clustered_fraction: float = 0.5, max_flips: int = 4
) -> np.ndarray:
    """`n` 64-bit hashes: `clustered_fraction` of them in clusters of 2-12 copies of a centre
    with up to `max_flips` bits flipped each, the rest uniform; shuffled."""
    rng = np.random.default_rng(seed)
    clustered = int(n * clustered_fraction)
    sizes = rng.integers(2, 13, size=max(1, clustered // 7 + 1))
    sizes = sizes[np.cumsum(sizes) <= clustered]
    centres = rng.integers(0, 2**64, size=len(sizes), dtype=np.uint64, endpoint=False)
    members = np.repeat(centres, sizes)
    flips = np.zeros(len(members), dtype=np.uint64)
    for _ in range(max_flips):
        bits = rng.integers(0, 64, size=len(members)).astype(np.uint64)
        flips ^= np.where(rng.random(len(members)) < 0.5, np.uint64(1) << bits, np.uint64(0))
    background = rng.integers(0, 2**64, size=n - len(members), dtype=np.uint64, endpoint=False)
    hashes = np.concatenate([members ^ flips, background])
    return hashes[rng.permutation(n)]


def _timed(hashes: np.ndarray, max_distance: int, method: str) -> tuple[float, tuple]:
    start = time.perf_counter()
    pairs = near_duplicate_pairs(hashes, max_distance, method)
    return time.perf_counter() - start, pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        help="numbers of hashes (default 10000 100000 1000000)",
    )
    parser.add_argument(
        "--all-pairs-up-to",
        type=int,
        default=100_000,
        help="run the quadratic all-pairs method up to this size (default 100000)",
    )
    parser.add_argument(
        "--max-distance", type=int, default=5, help="pHash distance grouped (default 5)"
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Time both methods at each size, check they agree, print the table with ratios."""
    print(f"near-duplicate pairs at pHash distance <= {args.max_distance}")
    print(f"{'hashes':>10} {'pairs':>10} {'all-pairs s':>12} {'index s':>9} {'speed-up':>9}")
    for size in args.sizes:
        hashes = synthetic_phashes(size, args.seed)
        index_s, pairs = _timed(hashes, args.max_distance, "index")
        all_cell, ratio_cell = "-", "-"
        if size <= args.all_pairs_up_to:
            all_s, reference = _timed(hashes, args.max_distance, "all-pairs")
            if not all(np.array_equal(a, b) for a, b in zip(pairs, reference, strict=True)):
                print(
                    f"{size:>10}: the index found {len(pairs[0])} pairs, all-pairs "
                    f"{len(reference[0])}: they differ (a bug; please report it)"
                )
                return 1
            all_cell, ratio_cell = f"{all_s:.3g}", f"{all_s / index_s:.1f}x"
        print(f"{size:>10} {len(pairs[0]):>10} {all_cell:>12} {index_s:>9.3g} {ratio_cell:>9}")
    return 0
