"""`tumorflow predict` against a live server (gRPC and REST) and against a closed port."""

from __future__ import annotations

import pytest

from tumorflow.cli.main import main

pytestmark = pytest.mark.service


@pytest.fixture()
def image_files(tmp_path, image) -> list[str]:
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"scan{seed}.png"
        path.write_bytes(image(seed, mode="L" if seed == 2 else "RGB"))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("rest", [False, True])
def test_predict_prints_class_and_probabilities_per_image(
    server, image_files, classes, capsys, rest
) -> None:
    port = server.rest_port if rest else server.grpc_port
    argv = [
        "predict",
        "--server",
        f"127.0.0.1:{port}",
        "--model_name",
        "tumor",
        "--version_label",
        "stable",
    ]
    code = main([*argv, *(["--rest"] if rest else []), *image_files])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    for path, line in zip(image_files, lines, strict=True):
        assert line.startswith(f"{path}: ")
        predicted = line.split(": ", 1)[1].split()[0]
        assert predicted in classes
        probabilities = {k: float(v) for k, v in (part.split("=") for part in line.split()[-3:])}
        assert set(probabilities) == set(classes)
        assert abs(sum(probabilities.values()) - 1) < 1e-3
        assert max(probabilities, key=probabilities.get) == predicted


@pytest.mark.parametrize("rest", [False, True])
def test_predict_against_a_closed_port_says_so_without_traceback(
    image_files, closed_port, capsys, rest
) -> None:
    argv = ["predict", "--server", f"127.0.0.1:{closed_port}", "--timeout", "3", *image_files]
    code = main([*argv, *(["--rest"] if rest else [])])
    err = capsys.readouterr().err
    assert code != 0
    assert "no model server answers at" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_predict_with_an_unknown_model_reports_not_found(server, image_files, capsys) -> None:
    code = main(
        [
            "predict",
            "--server",
            f"127.0.0.1:{server.grpc_port}",
            "--model_name",
            "absent",
            *image_files,
        ]
    )
    assert code == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_predict_converts_dicom_client_side_with_the_training_decode(
    server, tmp_path, capsys
) -> None:
    import numpy as np
    from dicom_fixtures import ct_phantom, write_dicom

    from tumorflow.components.data.dicom import dicom_to_png
    from tumorflow.core.config import DicomConfig

    single = write_dicom(tmp_path / "ct.dcm", ct_phantom(200, size=64))
    frames = np.stack([ct_phantom(level, size=64, seed=1) for level in (0, 300)])
    multi = write_dicom(tmp_path / "series" / "IM0001", frames)  # no extension, as in a series
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom at all")
    png = tmp_path / "ct.png"
    (png_bytes,) = dicom_to_png(single, DicomConfig())
    png.write_bytes(png_bytes)
    argv = ["predict", "--server", f"127.0.0.1:{server.grpc_port}", "--model_name", "tumor"]
    code = main([*argv, str(single), str(multi), str(broken), str(png)])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert code == 2
    assert [line.split(": ")[0] for line in lines] == [
        str(single),
        f"{multi}#0",
        f"{multi}#1",
        str(png),
    ]
    # the DICOM and the PNG its decode makes get the very same answer
    assert lines[0].split(": ", 1)[1] == lines[3].split(": ", 1)[1]
    assert f"{broken}: error: not a DICOM file" in captured.err
