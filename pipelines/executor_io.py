"""KFP's executor input and output, for a component run outside KFP's own launcher.

A component's container receives an executor input in its `{{$}}` argument (parameter values,
input and output artifacts, where to write the executor output) and writes an executor output
(the output artifacts with their metadata). The Kubeflow TFJob launcher (pipelines/
kubeflow_tfjob.py, pipelines/tfjob_launcher.py) runs the training component on each replica
itself, so it writes the one and reads the other: this module is the one place that knows
their shape (kfp.dsl.executor reads the same).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# The executor-input placeholder of a KFP container's args.
EXECUTOR_INPUT_PLACEHOLDER = "{{$}}"
# The schema version KFP writes for its system artifact types.
_SCHEMA_VERSION = "0.0.1"


def _artifacts(given: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {
        name: {
            "artifacts": [
                {
                    "name": name,
                    "type": {"schemaTitle": item["schema_title"], "schemaVersion": _SCHEMA_VERSION},
                    "uri": item["uri"],
                    "metadata": dict(item.get("metadata") or {}),
                }
            ]
        }
        for name, item in given.items()
    }


def executor_input(
    parameters: Mapping[str, Any],
    inputs: Mapping[str, Mapping[str, Any]],
    outputs: Mapping[str, Mapping[str, Any]],
    output_file: str,
) -> dict[str, Any]:
    """The executor input of one run of a Python component: its parameter values, and input and
    output artifacts given as `{name: {"uri", "schema_title", "metadata"}}`."""
    return {
        "inputs": {"parameterValues": dict(parameters), "artifacts": _artifacts(inputs)},
        "outputs": {"artifacts": _artifacts(outputs), "outputFile": output_file},
    }


def with_output_file(given: Mapping[str, Any], output_file: str) -> dict[str, Any]:
    """`given` writing its executor output to `output_file` instead."""
    return {**given, "outputs": {**given["outputs"], "outputFile": output_file}}


def args_with_input(args: list[str], given: Mapping[str, Any]) -> list[str]:
    """A component's container args with the executor-input placeholder filled in."""
    text = json.dumps(given)
    return [text if arg == EXECUTOR_INPUT_PLACEHOLDER else arg for arg in args]


def output_artifact_metadata(executor_output: str, name: str) -> dict[str, Any]:
    """The metadata the component wrote for its output artifact `name` (an executor output's
    JSON text); empty when it wrote none."""
    found = json.loads(executor_output).get("artifacts", {}).get(name, {}).get("artifacts", [{}])
    return dict(found[0].get("metadata", {})) if found else {}
