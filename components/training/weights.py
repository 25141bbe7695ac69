"""Pretrained ImageNet weights on machines without internet, and the digest of a run's start.

`keras.applications` downloads a backbone's ImageNet "notop" weights file into its cache
(`$KERAS_HOME/models/`, default `~/.keras/models/`) on first use and reuses a file found there,
checked against the hash its source publishes. `import_weights` puts a file copied from another
machine there under the name Keras looks for, after the checks Keras itself would make (an HDF5
file, the published hash) plus the one it would make only at training time (the file's layers fit
the backbone). Keras publishes MD5 hashes for these files (none for MobileNetV2): the import
checks that hash where one is published, and always records the file's SHA-256.

`starting_weights` names the weights a training starts from (a cached ImageNet file, a local
file, or none) with their SHA-256, for the run's MLflow params and model_info.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tumorflow.components.training.backbones import (
    MOBILENET_V2_SIZES,
    PRETRAINED_BACKBONES,
    KerasWeightsFile,
    build_backbone,
    imagenet_weights_file,
    keras_weights_cache,
    min_image_size,
)
from tumorflow.core.errors import WeightsUnavailableError

log = logging.getLogger(__name__)

# What `tumorflow weights import` checked, per file name, kept beside the files in the cache.
IMPORT_RECORD = "tumorflow_imported_weights.json"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# How a starting-weights file was checked.
CHECK_KERAS_HASH = "matches the hash Keras publishes"
CHECK_OWN_DIGEST = "no hash published by Keras: own digest recorded"
CHECK_LOCAL_FILE = "a local weights file: own digest recorded"


@dataclass(frozen=True)
class ImportedWeights:
    """One imported weights file: where it lies, its digest, and what it was checked against."""

    backbone: str
    file_name: str
    path: str
    sha256: str
    keras_hash: str | None
    check: str
    source: str
    imported_at: str


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _keras_hash_algorithm(keras_hash: str) -> str:
    """The algorithm of a published hash, chosen as Keras' `get_file(hash_algorithm="auto")`."""
    return "sha256" if len(keras_hash) == 64 else "md5"


def matches_keras_hash(path: Path, expected: KerasWeightsFile) -> bool:
    """Whether the file's bytes have the hash Keras publishes (False when none is published)."""
    if expected.keras_hash is None:
        return False
    return file_digest(path, _keras_hash_algorithm(expected.keras_hash)) == expected.keras_hash


def _check_hdf5(path: Path) -> None:
    """A readable HDF5 file with a legacy Keras weights layout, else one clear error."""
    import h5py

    with path.open("rb") as handle:
        signature = handle.read(len(_HDF5_SIGNATURE))
    if signature != _HDF5_SIGNATURE:
        raise WeightsUnavailableError(
            f"{path} is not an HDF5 file: give the Keras application's .h5 weights file"
        )
    try:
        with h5py.File(path, "r") as handle:
            group = handle.get("model_weights", handle)
            has_layers = "layer_names" in group.attrs
    except OSError as exc:
        raise WeightsUnavailableError(
            f"{path} is truncated or damaged ({path.stat().st_size} bytes; HDF5 says: {exc}): "
            "copy the file again and compare its size with the original"
        ) from exc
    if not has_layers:
        raise WeightsUnavailableError(
            f"{path} is an HDF5 file but not a Keras application's weights file (no layer_names); "
            "a .weights.h5 saved by Keras 3 goes into `train.weights` as a path instead"
        )


def _check_fits(path: Path, source: Path, backbone: str, image_size: int) -> None:
    """Load the file at `path` (a copy of `source`) into the backbone built with random weights,
    as Keras will load it."""
    model = build_backbone(backbone, max(image_size, min_image_size(backbone)), "none")
    try:
        model.load_weights(path)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"{source} does not fit the {backbone} backbone: is it another architecture's "
            f"weights file? Keras says: {exc}"
        ) from exc


def _read_record(cache: Path) -> dict[str, Any]:
    path = cache / IMPORT_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def import_weights(source: Path, backbone: str, image_size: int = 224) -> ImportedWeights:
    """Check `source` as the ImageNet notop weights of `backbone` at `image_size` and put it
    into the Keras cache under the name Keras looks for; record its SHA-256 there.

    Refused with one `WeightsUnavailableError` each: a missing, non-HDF5 or truncated file; a
    file whose bytes differ from the hash Keras publishes for that name (Keras would refuse it
    too, and try to download); a file whose layers do not fit the backbone.
    """
    source = Path(source)
    if not source.is_file():
        raise WeightsUnavailableError(f"weights file {source} does not exist")
    expected = imagenet_weights_file(backbone, image_size)
    _check_hdf5(source)
    sha256 = file_digest(source)
    if expected.keras_hash is not None:
        if not matches_keras_hash(source, expected):
            algorithm = _keras_hash_algorithm(expected.keras_hash)
            raise WeightsUnavailableError(
                f"{source} is not the file Keras publishes as {expected.name}: its {algorithm} "
                f"is {file_digest(source, algorithm)}, Keras expects {expected.keras_hash} "
                f"(keras.applications {backbone}). Copy that file unchanged; other weights of "
                "this backbone go into `train.weights` as a path."
            )
        check = CHECK_KERAS_HASH
    else:
        check = CHECK_OWN_DIGEST
    cache = keras_weights_cache()
    cache.mkdir(parents=True, exist_ok=True)
    # Checked under the name Keras loads it by (an .h5 name selects Keras' legacy HDF5 reader),
    # then moved into place in one step.
    staged = cache / f".importing-{expected.name}"
    shutil.copyfile(source, staged)
    try:
        _check_fits(staged, source, backbone, image_size)
        os.replace(staged, cache / expected.name)
    finally:
        staged.unlink(missing_ok=True)
    imported = ImportedWeights(
        backbone=backbone,
        file_name=expected.name,
        path=str(cache / expected.name),
        sha256=sha256,
        keras_hash=expected.keras_hash,
        check=check,
        source=str(source),
        imported_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    record = _read_record(cache)
    record[expected.name] = asdict(imported)
    (cache / IMPORT_RECORD).write_text(json.dumps(record, indent=2))
    log.info("imported %s as %s (sha256 %s; %s)", source, expected.name, sha256, check)
    return imported


@dataclass(frozen=True)
class NeededWeights:
    """A weights file a backbone needs at some image sizes, and whether the cache holds it."""

    backbone: str
    image_sizes: str
    file_name: str
    keras_hash: str | None
    cached: bool
    sha256: str | None
    check: str | None


def needed_weights() -> list[NeededWeights]:
    """Every ImageNet notop file the backbones load, by backbone and image size, with what the
    Keras cache holds of it (its recorded or computed SHA-256 and how it was checked)."""
    cache = keras_weights_cache()
    record = _read_record(cache)
    rows = []
    for backbone in PRETRAINED_BACKBONES:
        if backbone == "mobilenetv2":
            others = f"any other >= {min_image_size(backbone)}"
            sizes = [(str(s), s) for s in MOBILENET_V2_SIZES[:-1]] + [(f"224, {others}", 224)]
        else:
            sizes = [(f"any >= {min_image_size(backbone)}", 224)]
        for label, size in sizes:
            expected = imagenet_weights_file(backbone, size)
            path = cache / expected.name
            sha256 = check = None
            if path.is_file():
                imported = record.get(expected.name, {})
                sha256 = imported.get("sha256") or file_digest(path)
                check = imported.get("check") or _cached_check(path, expected)
            rows.append(
                NeededWeights(
                    backbone,
                    label,
                    expected.name,
                    expected.keras_hash,
                    path.is_file(),
                    sha256,
                    check,
                )
            )
    return rows


def _cached_check(path: Path, expected: KerasWeightsFile) -> str:
    if expected.keras_hash is None:
        return CHECK_OWN_DIGEST
    if matches_keras_hash(path, expected):
        return CHECK_KERAS_HASH
    return "differs from the hash Keras publishes: Keras will try to download it again"


def starting_weights(backbone: str, image_size: int, weights: str) -> dict[str, str]:
    """What a training starts from, for its MLflow params and model_info.json: `weights`
    (`none`, `imagenet` or a file path), the file and its SHA-256, and how it was checked.

    Call it after the backbone is built, so that an ImageNet file Keras downloaded is in its cache.
    """
    if weights == "none":
        return {"starting_weights": "none"}
    if weights == "imagenet":
        expected = imagenet_weights_file(backbone, image_size)
        path = keras_weights_cache() / expected.name
        if not path.is_file():
            # A resumed run restores its checkpoint and loads no ImageNet file.
            return {"starting_weights": weights, "starting_weights_file": expected.name}
        check = _cached_check(path, expected)
    else:
        path = Path(weights)
        check = CHECK_LOCAL_FILE
    return {
        "starting_weights": weights,
        "starting_weights_file": path.name,
        "starting_weights_sha256": file_digest(path),
        "starting_weights_check": check,
    }
