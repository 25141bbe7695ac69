"""Leakage-aware splitting: duplicate groups, then a stratified split that never cuts a group.

Groups are built by union-find over three kinds of links: identical SHA-256, perceptual hashes
within `SplitConfig.phash_max_distance` bits, and (optionally) consecutive file numbers of one
class folder (`Stone- (816).jpg`, `Stone- (817).jpg`: consecutive slices of one patient). A
consecutive-number link is made only when the two images also look alike (pHash distance at most
`SplitConfig.consecutive_max_distance`): a run of numbers is broken where one patient's series
ends and the next begins, otherwise a contiguously numbered class would collapse into one group.

Splits: `split_by_duplicate_groups` assigns whole groups to train/val/test, greedily filling the
per-class targets of each split (a stratified group split with exact fractions). With predefined
split folders (`keep_predefined`), files keep their folder's split, except that a group found in
more than one predefined split moves entirely to the most held-out of them (test, then val): a
leak is resolved by shrinking train, never by contaminating test. A missing val (or test) split is
carved out of train by groups.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from tumorflow.components.data.near_duplicates import near_duplicate_pairs
from tumorflow.core.config import SplitConfig
from tumorflow.core.errors import DatasetError

SPLITS = ("train", "val", "test")
_HELD_OUT_ORDER = {"train": 0, "val": 1, "test": 2}
_NUMBERED = re.compile(r"^(?P<prefix>.*?)\s*\(?(?P<number>\d+)\)?$")


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = np.arange(size)

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return int(root)

    def union(self, a: int, b: int) -> bool:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return False
        self.parent[max(root_a, root_b)] = min(root_a, root_b)
        return True


@dataclass(frozen=True)
class Grouping:
    """Group index per image and how the groups came about."""

    group_of: np.ndarray
    stats: dict


def _consecutive_pairs(paths: list[str], labels: list[str]) -> list[tuple[int, int]]:
    """Index pairs of files in one folder and class whose numbers differ by one."""
    numbered: dict[tuple[str, str, str], dict[int, int]] = {}
    for index, (path, label) in enumerate(zip(paths, labels, strict=True)):
        posix = PurePosixPath(path)
        match = _NUMBERED.match(posix.stem)
        if match:
            key = (str(posix.parent), label, match["prefix"].strip(" -_").lower())
            numbered.setdefault(key, {})[int(match["number"])] = index
    pairs = []
    for numbers in numbered.values():
        for number, index in numbers.items():
            following = numbers.get(number + 1)
            if following is not None:
                pairs.append((index, following))
    return pairs


def group_duplicates(
    paths: list[str],
    labels: list[str],
    sha256s: list[str],
    phashes: np.ndarray,
    split: SplitConfig,
) -> Grouping:
    """Union-find groups of exact duplicates, pHash near-duplicates and consecutive slices."""
    n = len(paths)
    union = _UnionFind(n)
    first_of_sha: dict[str, int] = {}
    for index, digest in enumerate(sha256s):
        union.union(first_of_sha.setdefault(digest, index), index)
    firsts, seconds = near_duplicate_pairs(phashes, split.phash_max_distance)
    for a, b in zip(firsts.tolist(), seconds.tolist(), strict=True):
        union.union(a, b)
    consecutive_links = 0
    if split.group_consecutive_numbers:
        hashes = np.asarray(phashes, dtype=np.uint64)
        for a, b in _consecutive_pairs(paths, labels):
            if int(np.bitwise_count(hashes[a] ^ hashes[b])) <= split.consecutive_max_distance:
                consecutive_links += union.union(a, b)
    roots = np.array([union.find(i) for i in range(n)], dtype=np.int64)
    _, group_of = np.unique(roots, return_inverse=True)
    sizes = np.bincount(group_of) if n else np.zeros(0, dtype=np.int64)
    sha_counts = Counter(sha256s)
    distinct_images = {
        (group, digest) for group, digest in zip(group_of.tolist(), sha256s, strict=True)
    }
    distinct_per_group = Counter(group for group, _ in distinct_images)
    stats = {
        "groups": len(sizes),
        "exact_duplicate_groups": sum(1 for count in sha_counts.values() if count > 1),
        "near_duplicate_groups": sum(1 for count in distinct_per_group.values() if count > 1),
        "max_distance": split.phash_max_distance,
        "near_duplicate_pairs": len(firsts),
        "consecutive_links": consecutive_links,
        "largest_group": int(sizes.max()) if n else 0,
        "grouped_images": int(sizes[sizes > 1].sum()) if n else 0,
    }
    return Grouping(group_of.astype(np.int64), stats)


def group_patients(grouping: Grouping, patients: list[str]) -> Grouping:
    """Merge the duplicate groups with patients: all images of one patient id ('' = unknown)
    end in one group, so a patient never straddles two splits."""
    if not any(patients):
        return grouping
    group_of = np.asarray(grouping.group_of)
    union = _UnionFind(len(group_of))
    first_of: dict[tuple[str, str], int] = {}
    for index, (group, patient) in enumerate(zip(group_of.tolist(), patients, strict=True)):
        union.union(first_of.setdefault(("group", str(group)), index), index)
        if patient:
            union.union(first_of.setdefault(("patient", patient), index), index)
    roots = np.array([union.find(i) for i in range(len(group_of))], dtype=np.int64)
    _, merged = np.unique(roots, return_inverse=True)
    sizes = np.bincount(merged)
    stats = {
        **grouping.stats,
        "groups": len(sizes),
        "patients": len({p for p in patients if p}),
        "largest_group": int(sizes.max()),
        "grouped_images": int(sizes[sizes > 1].sum()),
    }
    return Grouping(merged.astype(np.int64), stats)


def _greedy_assign(
    group_ids: np.ndarray,
    label_index: np.ndarray,
    n_classes: int,
    fractions: dict[str, float],
    seed: int,
) -> dict[int, str]:
    """Assign whole groups to splits so that each split's class counts approach its fraction."""
    groups = np.unique(group_ids)
    counts = np.zeros((len(groups), n_classes))
    position = {int(g): i for i, g in enumerate(groups)}
    for group, label in zip(group_ids.tolist(), label_index.tolist(), strict=True):
        counts[position[group], label] += 1
    names = list(fractions)
    shares = np.array([fractions[name] for name in names])
    targets = shares[:, None] * counts.sum(axis=0)[None, :]
    filled = np.zeros_like(targets)
    order = np.random.default_rng(seed).permutation(len(groups))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    assignment = {}
    for row in order:
        need = ((targets - filled) / np.maximum(targets, 1.0)) @ counts[row]
        need += 1e-9 * shares
        best = int(np.argmax(need))
        filled[best] += counts[row]
        assignment[int(groups[row])] = names[best]
    return assignment


def split_by_duplicate_groups(
    group_of: np.ndarray,
    label_index: np.ndarray,
    n_classes: int,
    split: SplitConfig,
    source_splits: list[str] | None = None,
) -> tuple[list[str], dict]:
    """The split of every image and a summary (`strategy`, predefined-split leaks).

    `source_splits` holds each image's predefined split ('' when none); it is used when
    `split.keep_predefined` is set and at least one image has one.
    """
    group_of = np.asarray(group_of)
    label_index = np.asarray(label_index)
    sources = list(source_splits or [""] * len(group_of))
    splits_of_group: dict[int, set[str]] = {}
    for group, source in zip(group_of.tolist(), sources, strict=True):
        if source:
            splits_of_group.setdefault(group, set()).add(source)
    leaking = {g: s for g, s in splits_of_group.items() if len(s) > 1}
    info: dict = {
        "source_split_leaks": {
            "groups": len(leaking),
            "images": int(np.isin(group_of, list(leaking)).sum()) if leaking else 0,
        }
    }
    use_predefined = split.keep_predefined and bool(splits_of_group)
    if not use_predefined:
        fractions = {
            "train": 1.0 - split.val_fraction - split.test_fraction,
            "val": split.val_fraction,
            "test": split.test_fraction,
        }
        assignment = _greedy_assign(group_of, label_index, n_classes, fractions, split.seed)
        info["strategy"] = "grouped-stratified"
        return [assignment[int(g)] for g in group_of], info

    group_split = {g: max(s, key=_HELD_OUT_ORDER.__getitem__) for g, s in splits_of_group.items()}
    result = [group_split.get(int(g), "train") for g in group_of]
    info["strategy"] = "predefined"
    info["moved_to_held_out"] = sum(
        1
        for g, source in zip(group_of.tolist(), sources, strict=True)
        if source and group_split[g] != source
    )
    present = set(result)
    carve = {
        name: getattr(split, f"{name}_fraction") for name in ("val", "test") if name not in present
    }
    if carve:
        in_train = np.array([s == "train" for s in result])
        fractions = {"train": 1.0 - sum(carve.values()), **carve}
        assignment = _greedy_assign(
            group_of[in_train], label_index[in_train], n_classes, fractions, split.seed
        )
        for index in np.flatnonzero(in_train):
            result[index] = assignment[int(group_of[index])]
        info["carved_from_train"] = sorted(carve)
    return result, info


LEAK_SEEDS = 10


def random_split_leakage(group_of: np.ndarray, split: SplitConfig, seeds: int = LEAK_SEEDS) -> dict:
    """What a naive random split would leak: the share of test images with a near-duplicate
    (an image of the same group) in train, when the images themselves, not their groups, are
    shuffled into train/val/test with `split`'s fractions. Simulated over `seeds` shuffles; the
    mean is the expected share, `min`/`max` its spread. No training: a count per shuffle."""
    group_of = np.asarray(group_of, dtype=np.int64)
    n = len(group_of)
    n_test = round(n * split.test_fraction)
    n_val = round(n * split.val_fraction)
    shares = []
    for seed in range(seeds):
        order = np.random.default_rng(split.seed + seed).permutation(n)
        test, train = order[:n_test], order[n_test + n_val :]
        in_train = np.bincount(group_of[train], minlength=int(group_of.max(initial=-1)) + 1)
        shares.append(float((in_train[group_of[test]] > 0).mean()) if n_test else 0.0)
    return {
        "test_share": round(float(np.mean(shares)), 4) if shares else 0.0,
        "min": round(min(shares), 4) if shares else 0.0,
        "max": round(max(shares), 4) if shares else 0.0,
        "seeds": seeds,
        "test_images": n_test,
    }


def source_split_leakage(group_of: np.ndarray, source_splits: list[str]) -> dict | None:
    """The share of the source's own test images (its test folder) that have a near-duplicate in
    its own train folder; None when the source has no train and test folders."""
    group_of = np.asarray(group_of, dtype=np.int64)
    sources = np.asarray(source_splits, dtype=object)
    test, train = sources == "test", sources == "train"
    if not test.any() or not train.any():
        return None
    leaked = np.isin(group_of[test], group_of[train])
    return {
        "test_share": round(float(leaked.mean()), 4),
        "test_images": int(test.sum()),
        "leaked_images": int(leaked.sum()),
    }


def balanced_class_weights(counts: list[int]) -> list[float]:
    """The one class-weight formula: `n_train / (n_classes * count_c)` per class, so that every
    class weighs as much in the loss; a class without training images gets 1.0."""
    total = sum(counts)
    return [total / (len(counts) * count) if count else 1.0 for count in counts]


def class_weights(train_label_index: np.ndarray, classes: list[str]) -> dict[str, float]:
    """The split manifest's `class_weights` (`balanced_class_weights`); every class must occur in
    train."""
    counts = np.bincount(np.asarray(train_label_index, dtype=np.int64), minlength=len(classes))
    missing = [name for name, count in zip(classes, counts, strict=True) if count == 0]
    if missing:
        raise DatasetError(
            f"the training split has no images of {missing}; add data or lower the held-out fractions"
        )
    weights = balanced_class_weights([int(count) for count in counts])
    return {name: round(weight, 6) for name, weight in zip(classes, weights, strict=True)}
