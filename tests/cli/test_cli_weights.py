"""`tumorflow weights import|list`: a copied notop file goes into the Keras cache and is listed;
a file that is not the one Keras publishes is one error line, nothing cached."""

from __future__ import annotations

import json

from helpers import isolated_keras_cache, write_notop_weights

from tumorflow.cli.main import main

MOBILENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5"


def test_import_then_list_shows_the_cached_file_and_its_digest(tmp_path, monkeypatch, capsys):
    cache = isolated_keras_cache(monkeypatch, tmp_path / "keras_home")
    copied = tmp_path / "usb" / MOBILENET_FILE
    copied.parent.mkdir()
    write_notop_weights("mobilenetv2", 128, copied)

    args = ["weights", "import", str(copied), "--backbone", "mobilenetv2", "--image-size", "128"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"imported {copied} as {cache / MOBILENET_FILE}" in out
    assert "no hash published by Keras: own digest recorded" in out

    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert f"Keras cache: {cache}" in out
    (row,) = [
        line for line in out.splitlines() if line.startswith("mobilenetv2") and "_128_" in line
    ]
    assert row.split()[:3] == ["mobilenetv2", "128", "yes"]
    assert "xception_weights_tf_dim_ordering_tf_kernels_notop.h5" in out
    assert main(["weights", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    (cached,) = [row for row in listed["files"] if row["cached"]]
    assert cached["file_name"] == MOBILENET_FILE and len(cached["sha256"]) == 64


def test_a_file_that_is_not_keras_published_one_is_one_error_line(tmp_path, monkeypatch, capsys):
    import h5py

    cache = isolated_keras_cache(monkeypatch, tmp_path / "keras_home")
    other = tmp_path / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(other, "w") as handle:
        handle.attrs["layer_names"] = []

    assert main(["weights", "import", str(other), "--backbone", "densenet121"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tumorflow weights: error: ")
    assert "Keras expects 30ee3e1110167f948a6b9946edeeb738" in err and "\n" not in err
    assert not (cache / other.name).exists()
