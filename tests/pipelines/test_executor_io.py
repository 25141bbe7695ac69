"""The executor input the TFJob launcher writes is the one KFP's own executor runs a component
with, and the metadata the component writes comes back through its executor output."""

import json

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output
from kfp.dsl.executor import Executor

from tumorflow.pipelines import executor_io


@dsl.component
def _tiny_train(split: Input[Dataset], epochs: int, model: Output[Model]):
    model.metadata["epochs"] = epochs
    model.metadata["split_rows"] = split.metadata["rows"]


def test_kfp_runs_a_component_from_the_executor_input_and_the_launcher_reads_its_output(tmp_path):
    given = executor_io.executor_input(
        {"epochs": 3},
        {
            "split": {
                "uri": str(tmp_path / "split"),
                "schema_title": "system.Dataset",
                "metadata": {"rows": 40},
            }
        },
        {"model": {"uri": str(tmp_path / "model"), "schema_title": "system.Model"}},
        str(tmp_path / "first.json"),
    )
    replica = executor_io.with_output_file(given, str(tmp_path / "chief.json"))

    Executor(replica, _tiny_train).execute()

    written = (tmp_path / "chief.json").read_text()
    assert executor_io.output_artifact_metadata(written, "model") == {"epochs": 3, "split_rows": 40}
    assert not (tmp_path / "first.json").exists()
    assert executor_io.output_artifact_metadata(written, "reference") == {}


def test_the_placeholder_of_a_component_s_args_becomes_the_executor_input():
    given = executor_io.executor_input({"epochs": 1}, {}, {}, "/tmp/out.json")
    args = [
        "--executor_input",
        executor_io.EXECUTOR_INPUT_PLACEHOLDER,
        "--function_to_execute",
        "f",
    ]

    filled = executor_io.args_with_input(args, given)

    assert json.loads(filled[1]) == given
    assert filled[0] == "--executor_input" and filled[2:] == args[2:]
