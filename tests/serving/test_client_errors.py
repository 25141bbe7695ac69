"""`tumorflow predict` mistakes a user makes: the wrong port for the protocol, a file that is no
image, a file that cannot be read: one line each, and the other images still answered."""

from __future__ import annotations

from pathlib import Path

import pytest

from tumorflow.cli.main import main

pytestmark = pytest.mark.service


def _predict(server_address: str, *paths: str, rest: bool = False) -> list[str]:
    argv = ["predict", "--server", server_address, "--model_name", "tumor", "--timeout", "5"]
    return [*argv, *(["--rest"] if rest else []), *paths]


@pytest.mark.parametrize("rest", [False, True])
def test_the_other_protocols_port_is_named_in_one_line(
    server, image, tmp_path: Path, capsys: pytest.CaptureFixture, rest: bool
) -> None:
    scan = tmp_path / "scan.png"
    scan.write_bytes(image(1))
    wrong_port = server.grpc_port if rest else server.rest_port
    code = main(_predict(f"127.0.0.1:{wrong_port}", str(scan), rest=rest))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert (
        "is it the gRPC port? Drop --rest" if rest else "is it the REST port? Add --rest"
    ) in err


@pytest.mark.parametrize("rest", [False, True])
def test_a_non_image_and_an_unreadable_file_are_named_and_the_rest_answered(
    server, image, tmp_path: Path, capsys: pytest.CaptureFixture, rest: bool
) -> None:
    good = [tmp_path / "a.png", tmp_path / "c.png"]
    for seed, path in enumerate(good):
        path.write_bytes(image(seed))
    notes = tmp_path / "b.txt"
    notes.write_text("not an image at all")
    missing = tmp_path / "gone.png"
    port = server.rest_port if rest else server.grpc_port
    code = main(
        _predict(
            f"127.0.0.1:{port}", str(good[0]), str(notes), str(missing), str(good[1]), rest=rest
        )
    )
    captured = capsys.readouterr()
    answered = captured.out.strip().splitlines()
    errors = captured.err.strip().splitlines()
    assert code == 2
    assert [line.split(": ")[0] for line in answered] == [str(good[0]), str(good[1])]
    assert len(errors) == 2 and "Traceback" not in captured.err
    assert errors[0] == f"{missing}: error: cannot read it: No such file or directory"
    assert errors[1].startswith(f"{notes}: error: ") and "refused the request" in errors[1]
