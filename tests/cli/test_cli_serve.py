"""`tumorflow predict` asks the model of the preset or config it is given, under either spelling
of TF Serving's `--model_name`."""

from __future__ import annotations

import pytest

from tumorflow.cli.main import build_parser
from tumorflow.cli.pipeline import config_from_args
from tumorflow.cli.serve import predict_target


def _target(*argv: str):
    args = build_parser().parse_args(["predict", *argv, "scan.png"])
    return predict_target(args, config_from_args(args, default_preset=None))


@pytest.mark.parametrize(
    ("argv", "model"),
    [
        ((), "kidney-ct"),
        (("--preset", "brain_mri"), "brain-mri"),
        (("--preset", "chest_ct"), "chest-ct"),
        (("--set", "deploy.model_name=my-model"), "my-model"),
        (("--preset", "brain_mri", "--model_name", "other"), "other"),
        (("--preset", "brain_mri", "--model-name", "other"), "other"),
    ],
)
def test_predict_asks_the_model_of_its_preset_unless_named(argv: tuple[str, ...], model: str):
    assert _target(*argv).name == model


def test_predict_passes_the_version_label_and_signature():
    target = _target("--version_label", "canary", "--signature_name", "explain")
    assert (target.label, target.signature_name, target.version) == (
        "canary",
        "explain",
        None,
    )
