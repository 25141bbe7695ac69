"""Duplicate grouping and the stratified group split: groups never straddle splits."""

from __future__ import annotations

import numpy as np
import pytest

from tumorflow.components.data.split import (
    class_weights,
    group_duplicates,
    random_split_leakage,
    source_split_leakage,
    split_by_duplicate_groups,
)
from tumorflow.core.config import SplitConfig
from tumorflow.core.errors import DatasetError


def _hashes(count: int, seed: int = 0) -> np.ndarray:
    """Random 64-bit hashes, far apart from each other (about 32 bits)."""
    return np.random.default_rng(seed).integers(0, 2**63, size=count, dtype=np.uint64) * np.uint64(
        2
    ) + np.uint64(1)


def test_exact_and_near_duplicates_share_a_group() -> None:
    hashes = _hashes(6)
    hashes[1] = hashes[0]
    hashes[3] = hashes[2] ^ np.uint64(0b111)
    shas = ["a", "a", "b", "c", "d", "e"]
    paths = [f"x/{name}.png" for name in "uvwxyz"]
    grouping = group_duplicates(
        paths, ["cyst"] * 6, shas, hashes, SplitConfig(phash_max_distance=3)
    )
    group_of = grouping.group_of
    assert group_of[0] == group_of[1]
    assert group_of[2] == group_of[3]
    assert len(set(group_of.tolist())) == 4
    assert grouping.stats["groups"] == 4
    assert grouping.stats["exact_duplicate_groups"] == 1
    assert grouping.stats["near_duplicate_groups"] == 1


def test_consecutive_numbers_group_only_slices_that_look_alike() -> None:
    hashes = _hashes(5)
    hashes[1] = hashes[0] ^ np.uint64(0xFF)
    hashes[2] = hashes[1] ^ np.uint64(0xFF00)
    paths = [f"Stone/Stone- ({n}).jpg" for n in (816, 817, 818, 819)] + ["Cyst/Cyst- (817).jpg"]
    labels = ["stone"] * 4 + ["cyst"]
    config = SplitConfig(
        phash_max_distance=2, group_consecutive_numbers=True, consecutive_max_distance=10
    )
    grouping = group_duplicates(paths, labels, list("abcde"), hashes, config)
    group_of = grouping.group_of.tolist()
    assert group_of[0] == group_of[1] == group_of[2]
    assert group_of[3] != group_of[2], "a new patient's unlike slice starts a new group"
    assert group_of[4] != group_of[0], "other classes' numbers are not linked"
    assert grouping.stats["consecutive_links"] == 2
    off = group_duplicates(paths, labels, list("abcde"), hashes, SplitConfig(phash_max_distance=2))
    assert len(set(off.group_of.tolist())) == 5


def _grouped_dataset(n_groups: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Groups of 1-5 images, three classes in proportions 3:2:1."""
    rng = np.random.default_rng(seed)
    group_of, labels = [], []
    for group in range(n_groups):
        label = [0, 0, 0, 1, 1, 2][group % 6]
        for _ in range(int(rng.integers(1, 6))):
            group_of.append(group)
            labels.append(label)
    return np.array(group_of), np.array(labels)


def test_groups_never_straddle_and_class_proportions_are_kept() -> None:
    group_of, labels = _grouped_dataset()
    assigned, info = split_by_duplicate_groups(
        group_of, labels, 3, SplitConfig(val_fraction=0.15, test_fraction=0.2)
    )
    assert info["strategy"] == "grouped-stratified"
    for group in np.unique(group_of):
        assert len({assigned[i] for i in np.flatnonzero(group_of == group)}) == 1
    assigned = np.array(assigned)
    overall = np.bincount(labels, minlength=3) / len(labels)
    for name, share in (("train", 0.65), ("val", 0.15), ("test", 0.2)):
        in_split = labels[assigned == name]
        assert abs(len(in_split) / len(labels) - share) < 0.06
        assert np.abs(np.bincount(in_split, minlength=3) / len(in_split) - overall).max() < 0.12


def test_the_split_is_reproducible_and_depends_on_the_seed() -> None:
    group_of, labels = _grouped_dataset()
    first, _ = split_by_duplicate_groups(group_of, labels, 3, SplitConfig(seed=1))
    again, _ = split_by_duplicate_groups(group_of, labels, 3, SplitConfig(seed=1))
    other, _ = split_by_duplicate_groups(group_of, labels, 3, SplitConfig(seed=2))
    assert first == again
    assert first != other


def test_predefined_split_is_kept_and_a_leaking_group_moves_to_test() -> None:
    group_of = np.array([0, 0, 1, 2, 3, 4, 4, 5, 6, 7])
    labels = np.array([0, 0, 1, 0, 1, 0, 0, 1, 0, 1])
    sources = ["train", "test", "train", "train", "train", "val", "val", "test", "test", "val"]
    assigned, info = split_by_duplicate_groups(
        group_of, labels, 2, SplitConfig(keep_predefined=True), sources
    )
    assert info["strategy"] == "predefined"
    assert assigned[:2] == ["test", "test"]
    assert assigned[2:] == sources[2:]
    assert info["source_split_leaks"] == {"groups": 1, "images": 2}
    assert info["moved_to_held_out"] == 1


def test_val_is_carved_out_of_train_by_groups_when_only_train_and_test_exist() -> None:
    group_of, labels = _grouped_dataset(60)
    sources = ["test" if g % 5 == 0 else "train" for g in group_of]
    assigned, info = split_by_duplicate_groups(
        group_of, labels, 3, SplitConfig(val_fraction=0.2), sources
    )
    assert info["carved_from_train"] == ["val"]
    assert all(a == "test" for a, s in zip(assigned, sources, strict=True) if s == "test")
    assert {a for a, s in zip(assigned, sources, strict=True) if s == "train"} == {"train", "val"}
    for group in np.unique(group_of):
        assert len({assigned[i] for i in np.flatnonzero(group_of == group)}) == 1


def test_predefined_split_is_ignored_when_keep_predefined_is_off_but_leaks_are_reported() -> None:
    group_of = np.repeat(np.arange(40), 2)
    labels = np.repeat(np.arange(40) % 2, 2)
    sources = ["train", "test"] * 40
    assigned, info = split_by_duplicate_groups(
        group_of, labels, 2, SplitConfig(keep_predefined=False), sources
    )
    assert info["strategy"] == "grouped-stratified"
    assert info["source_split_leaks"]["groups"] == 40
    assert all(assigned[i] == assigned[i + 1] for i in range(0, 80, 2))


def test_class_weights_balance_the_training_split() -> None:
    weights = class_weights(np.array([0, 0, 0, 1]), ["a", "b"])
    assert weights == {"a": pytest.approx(4 / 6), "b": pytest.approx(2.0)}
    with pytest.raises(DatasetError, match="no images of"):
        class_weights(np.array([0, 0]), ["a", "b"])


def test_class_weights_balance_the_classes_and_training_uses_the_same_formula():
    from tumorflow.components.data.split import balanced_class_weights, class_weights
    from tumorflow.components.training import train

    labels = np.array([0] * 30 + [1] * 10)
    weights = class_weights(labels, ["normal", "tumor"])
    assert weights == {"normal": round(40 / 60, 6), "tumor": 2.0}
    # a manifest without weights: training computes them from its counts, the same way
    manifest = {"splits": {"train": {"class_counts": {"normal": 30, "tumor": 10}}}}
    assert train.class_weights(manifest, ["normal", "tumor"]) == {0: 40 / 60, 1: 2.0}
    assert balanced_class_weights([5, 0]) == [0.5, 1.0]


def test_random_split_of_distinct_images_leaks_nothing() -> None:
    report = random_split_leakage(np.arange(200), SplitConfig())
    assert report["test_share"] == report["max"] == 0.0
    assert report["test_images"] == 30


def test_random_split_of_groups_of_ten_leaks_nearly_every_test_image() -> None:
    group_of = np.repeat(np.arange(20), 10)
    report = random_split_leakage(group_of, SplitConfig(), seeds=8)
    # a test image escapes only if its 9 group-mates all miss train: about 0.3 ** 9
    assert report["min"] >= 0.95
    assert report["seeds"] == 8


def test_random_split_of_pairs_leaks_about_the_train_fraction() -> None:
    group_of = np.repeat(np.arange(500), 2)
    report = random_split_leakage(group_of, SplitConfig(val_fraction=0.15, test_fraction=0.15))
    assert report["test_share"] == pytest.approx(0.7, abs=0.05)
    assert report["min"] <= report["test_share"] <= report["max"]


def test_source_folders_leak_the_share_of_test_images_copied_from_train() -> None:
    # 10 train images; the test folder holds 4 copies of train images and 6 images of its own
    group_of = np.array([*range(10), 0, 1, 2, 3, *range(10, 16)])
    sources = ["train"] * 10 + ["test"] * 10
    report = source_split_leakage(group_of, sources)
    assert report == {"test_share": 0.4, "test_images": 10, "leaked_images": 4}
    assert source_split_leakage(group_of, [""] * 20) is None
