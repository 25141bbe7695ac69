"""The KFP step wrappers pass the configuration on to the step functions."""

from __future__ import annotations

import inspect

from tumorflow.core.config import DriftConfig
from tumorflow.pipelines import steps


def test_the_evaluate_step_defaults_to_the_configured_embedding_components():
    # The drift reference is built by evaluate. KFP needs a literal default in the component's
    # source; it must stay DriftConfig's
    parameter = inspect.signature(steps.evaluate.python_func).parameters
    assert parameter["embedding_components"].default == DriftConfig().embedding_components
    spec = steps.evaluate.component_spec
    assert spec.inputs["embedding_components"].default == DriftConfig().embedding_components
