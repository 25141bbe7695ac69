"""Grad-CAM from the served `explain` signature: the pointing game on phantom lesions, and
`tumorflow predict --explain` against a live server."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tumorflow.bench.pointing_game import (
    peak_hits_lesion,
    play_pointing_game,
    train_phantom_classifier,
)
from tumorflow.components.data.phantom import generate_phantom, images_folder, phantom_slices


def test_phantom_slices_are_the_written_files_with_masks_on_their_lesions(tmp_path):
    root = generate_phantom(tmp_path, per_class=4, size=48, seed=2)
    slices = list(phantom_slices(per_class=4, size=48, seed=2))
    assert len(slices) == 16
    for one in slices:
        written = np.asarray(Image.open(images_folder(root) / one.kind / f"{one.name}.jpg"))
        # JPEG round trip: the same picture within compression error.
        assert np.abs(written.astype(int) - one.pixels.astype(int)).mean() < 3
        assert one.lesion_mask.shape == (48, 48)
        assert one.lesion_mask.any() == (one.kind != "Normal")
    stone = next(s for s in slices if s.kind == "Stone")
    # A stone is calcium-bright: brighter on average than the slice around it.
    assert stone.pixels[stone.lesion_mask].mean() > stone.pixels[~stone.lesion_mask].mean()


def test_a_peak_counts_when_it_is_on_the_lesion_or_within_the_tolerance():
    mask = np.zeros((64, 64), bool)
    mask[40:44, 10:14] = True
    heatmap = np.zeros((32, 32))
    heatmap[21, 6] = 1.0  # (42.5, 12.5) at the mask's scale: between lesion pixels
    assert peak_hits_lesion(heatmap, mask, tolerance=1)
    heatmap[21, 6], heatmap[5, 25] = 0.0, 1.0  # far away
    assert not peak_hits_lesion(heatmap, mask, tolerance=4)
    assert not peak_hits_lesion(heatmap, np.zeros((64, 64), bool), tolerance=100)


@pytest.fixture(scope="module")
def phantom_export(tmp_path_factory):
    """The pointing game's model: 480 slices, 20 epochs (about 80 s on one core)."""
    return train_phantom_classifier(tmp_path_factory.mktemp("phantom-model"), 120, 64, 20)


# The benchmark's bar needs a model trained for it: -m exhaustive (`tumorflow bench explain` too).
@pytest.mark.exhaustive
def test_the_explain_heat_map_points_at_the_lesion_of_four_in_five_slices(phantom_export):
    result = play_pointing_game(phantom_export, phantom_slices(40, 64, seed=7))
    print(result.summary())
    assert sum(result.counted.values()) >= 30, result.summary()
    # The bar; this model (64 px) measured 90.9% against a random peak's 5.7%.
    assert result.hit_rate >= 0.8, result.summary()
    assert result.hit_rate >= 10 * result.chance_rate, result.summary()


@pytest.mark.e2e
def test_predict_explain_writes_an_overlay_per_image(tiny_model, tmp_path, capsys):
    import shutil

    from tumorflow.cli.main import main
    from tumorflow.serving.server import ModelServer, ServerOptions

    # any model with an explain signature will do
    shutil.copytree(tiny_model / "saved_model", tmp_path / "models" / "kidney-ct" / "1")
    scans = []
    for one in list(phantom_slices(4, 64, seed=9))[::4]:
        path = tmp_path / f"{one.kind}.png"
        Image.fromarray(one.pixels).resize((100, 100)).save(path)
        scans.append(str(path))
    server = ModelServer(
        ServerOptions(
            port=0,
            rest_api_port=0,
            model_name="kidney-ct",
            model_base_path=str(tmp_path / "models" / "kidney-ct"),
        )
    )
    server.start()
    try:
        argv = ["predict", "--server", f"127.0.0.1:{server.grpc_port}", "--model_name", "kidney-ct"]
        code = main([*argv, "--explain", str(tmp_path / "cams"), *scans])
    finally:
        server.stop()
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == len(scans)
    for scan, line in zip(scans, lines, strict=True):
        overlay = tmp_path / "cams" / f"{scan.rsplit('/', 1)[1][:-4]}.gradcam.png"
        assert line.startswith(f"{scan}: ") and line.endswith(f"overlay={overlay}")
        picture = Image.open(overlay)
        # At the scan's own size, in colour (the heat map over the grey scan).
        assert picture.size == (100, 100) and picture.mode == "RGB"
        pixels = np.asarray(picture).astype(int)
        assert np.abs(pixels[..., 0] - pixels[..., 2]).max() > 50
