"""ImageNet weights offline: an imported file loads from the Keras cache without a download; a
wrong hash, a wrong architecture and a truncated file are refused with one clear error each."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from helpers import isolated_keras_cache, write_notop_weights

from tumorflow.components.training import weights as weights_module
from tumorflow.components.training.backbones import (
    PRETRAINED_BACKBONES,
    KerasWeightsFile,
    build_backbone,
    imagenet_weights_file,
    min_image_size,
)
from tumorflow.components.training.weights import (
    CHECK_KERAS_HASH,
    CHECK_LOCAL_FILE,
    CHECK_OWN_DIGEST,
    IMPORT_RECORD,
    import_weights,
    needed_weights,
    starting_weights,
)
from tumorflow.core.errors import WeightsUnavailableError

# MobileNetV2 is the smallest backbone, and the one whose file Keras publishes no hash for.
MOBILENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"


@pytest.fixture
def keras_cache(tmp_path, monkeypatch):
    return isolated_keras_cache(monkeypatch, tmp_path / "keras_home")


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory):
    """A MobileNetV2 notop file at 96 px, under the name Keras downloads it by, and its weights."""
    path = tmp_path_factory.mktemp("copied") / MOBILENET_FILE
    return path, write_notop_weights("mobilenetv2", 96, path)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_imported_file_loads_from_the_cache_without_a_download(keras_cache, mobilenet_weights):
    source, written = mobilenet_weights

    imported = import_weights(source, "mobilenetv2", 96)

    assert imported.file_name == MOBILENET_FILE
    assert (keras_cache / MOBILENET_FILE).read_bytes() == source.read_bytes()
    assert imported.sha256 == _sha256(source) and imported.check == CHECK_OWN_DIGEST
    recorded = json.loads((keras_cache / IMPORT_RECORD).read_text())[MOBILENET_FILE]
    assert recorded["sha256"] == imported.sha256 and recorded["source"] == str(source)
    # keras.applications itself finds the file: a download attempt would fail the test.
    loaded = build_backbone("mobilenetv2", 96, "imagenet")
    for expected, got in zip(written, loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(expected, got)
    assert starting_weights("mobilenetv2", 96, "imagenet") == {
        "starting_weights": "imagenet",
        "starting_weights_file": MOBILENET_FILE,
        "starting_weights_sha256": imported.sha256,
        "starting_weights_check": CHECK_OWN_DIGEST,
    }
    listed = {(row.backbone, row.file_name): row for row in needed_weights()}
    row = listed["mobilenetv2", MOBILENET_FILE]
    assert row.cached and row.sha256 == imported.sha256 and row.image_sizes == "96"
    assert not listed["xception", imagenet_weights_file("xception", 299).name].cached


def test_a_file_with_the_published_hash_is_recorded_as_checked(
    keras_cache, mobilenet_weights, monkeypatch
):
    source, _ = mobilenet_weights
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    monkeypatch.setattr(
        weights_module,
        "imagenet_weights_file",
        lambda backbone, size: KerasWeightsFile(MOBILENET_FILE, md5),
    )

    imported = import_weights(source, "mobilenetv2", 96)

    assert imported.check == CHECK_KERAS_HASH and imported.keras_hash == md5
    assert imported.sha256 == _sha256(source)


def test_a_known_name_with_other_bytes_is_refused(keras_cache, mobilenet_weights, tmp_path):
    name = imagenet_weights_file("xception", 299).name
    impostor = tmp_path / name
    impostor.write_bytes(mobilenet_weights[0].read_bytes())

    with pytest.raises(WeightsUnavailableError) as error:
        import_weights(impostor, "xception", 299)

    message = str(error.value)
    assert f"not the file Keras publishes as {name}" in message
    assert "b0042744bf5b25fce3cb969f33bebb97" in message
    assert hashlib.md5(impostor.read_bytes()).hexdigest() in message
    assert not (keras_cache / name).exists()


def test_weights_of_another_architecture_are_refused_naming_both(keras_cache, tmp_path):
    other = tmp_path / "custom_cnn.h5"
    write_notop_weights("custom_cnn", 48, other)

    with pytest.raises(WeightsUnavailableError) as error:
        import_weights(other, "mobilenetv2", 96)

    message = str(error.value)
    assert f"{other} does not fit the mobilenetv2 backbone" in message
    assert not keras_cache.exists() or not any(keras_cache.iterdir())


def test_a_truncated_file_is_refused(keras_cache, mobilenet_weights, tmp_path):
    data = mobilenet_weights[0].read_bytes()
    truncated = tmp_path / MOBILENET_FILE
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(WeightsUnavailableError, match="is truncated or damaged"):
        import_weights(truncated, "mobilenetv2", 96)
    assert not (keras_cache / MOBILENET_FILE).exists()


def test_a_file_that_is_not_hdf5_is_refused(keras_cache, tmp_path):
    page = tmp_path / MOBILENET_FILE
    page.write_text("<html>403 Forbidden</html>")

    with pytest.raises(WeightsUnavailableError, match="is not an HDF5 file"):
        import_weights(page, "mobilenetv2", 96)


def test_starting_weights_name_a_local_file_and_none(mobilenet_weights):
    source, _ = mobilenet_weights
    assert starting_weights("mobilenetv2", 96, "none") == {"starting_weights": "none"}
    local = starting_weights("mobilenetv2", 96, str(source))
    assert local["starting_weights_sha256"] == _sha256(source)
    assert local["starting_weights_check"] == CHECK_LOCAL_FILE


# The new backbones and MobileNetV2's size-dependent name run in make test; the rest (a build
# each) with `pytest -m exhaustive`.
TABLE_IN_MAKE_TEST = {("xception", 71), ("densenet121", 32), ("mobilenetv2", 96)}


@pytest.mark.parametrize(
    ("backbone", "image_size"),
    [
        case if case in TABLE_IN_MAKE_TEST else pytest.param(*case, marks=pytest.mark.exhaustive)
        for case in [(b, min_image_size(b)) for b in PRETRAINED_BACKBONES] + [("mobilenetv2", 96)]
    ],
)
def test_the_file_table_is_what_keras_applications_downloads(backbone, image_size, monkeypatch):
    """The file name and hash are those the backbone's Keras source passes to `get_file`."""
    import keras.src.utils.file_utils as keras_files

    class Requested(Exception):
        pass

    def record(fname, origin, *args, file_hash=None, **kwargs):
        raise Requested(fname, file_hash)

    monkeypatch.setattr(keras_files, "get_file", record)
    with pytest.raises(Requested) as requested:
        build_backbone(backbone, image_size, "imagenet")
    expected = imagenet_weights_file(backbone, image_size)
    assert requested.value.args == (expected.name, expected.keras_hash)
