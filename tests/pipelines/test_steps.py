"""The KFP step wrappers pass the configuration on to the step functions."""

from __future__ import annotations

import inspect

from tumorflow.core.config import DriftConfig
from tumorflow.pipelines import steps


def test_the_drift_reference_step_defaults_to_the_configured_embedding_components():
    # KFP needs a literal default in the component's source; it must stay DriftConfig's
    parameter = inspect.signature(steps.drift_reference.python_func).parameters
    assert parameter["embedding_components"].default == DriftConfig().embedding_components
    spec = steps.drift_reference.component_spec
    assert spec.inputs["embedding_components"].default == DriftConfig().embedding_components
