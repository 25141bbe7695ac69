"""`tumorflow bench train`: the per-epoch cost table, the scaling table and bad arguments."""

from __future__ import annotations

import argparse

import pytest

from tumorflow.bench.train import add_arguments, epoch_costs, run, scaling_table
from tumorflow.core.errors import ConfigError


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_each_addition_is_its_median_steady_epoch_cost_against_the_plain_epoch():
    # The first epoch of each run (caches, tracing) is not counted.
    plain = [
        [{"epoch_total": 9.0, "validation": 2.0}] + [{"epoch_total": 4.0, "validation": 0.5}] * 3
    ]
    recipe = [
        [{"epoch_total": 20.0, "train": 9.0, "validation": 3.0}]
        + [
            {
                "epoch_total": 5.0,
                "train": 3.5,
                "batchnorm_recalibration": 0.4,
                "validation": 0.6,
                "checkpoint": 0.2,
                "mlflow": 0.04,
            }
        ]
        * 3
    ]
    rows = {row["name"].split(" (")[0]: row for row in epoch_costs(plain, recipe)}
    assert rows["plain fit epoch"]["seconds"] == 4.0
    assert rows["BatchNorm recalibration"]["ratio"] == pytest.approx(0.1)
    # the validation pass is counted beyond the validation a plain fit makes too
    assert rows["validation pass"]["seconds"] == pytest.approx(0.1)
    assert rows["best-epoch tracking"]["seconds"] == 0.0
    assert rows["our epoch, every default on"]["ratio"] == pytest.approx(1.25)


def test_efficiency_is_throughput_against_replicas_times_one_replica():
    rows = scaling_table(
        [{"replicas": 1, "images_per_s": 100.0}, {"replicas": 2, "images_per_s": 150.0}]
    )
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["speedup"] == pytest.approx(1.5)
    assert rows[1]["efficiency"] == pytest.approx(0.75)


@pytest.mark.parametrize("replicas", ["one,two", "0,1"])
def test_bad_replica_counts_are_a_config_error(replicas):
    with pytest.raises(ConfigError, match="replicas"):
        run(_args("--measure", "scaling", "--replicas", replicas))


@pytest.mark.parametrize(
    ("argv", "match"),
    [(["--measure", "speed"], "--measure"), (["--measure", "recipe", "--epochs", "1"], "epochs")],
)
def test_bad_recipe_arguments_are_a_config_error(argv, match):
    with pytest.raises(ConfigError, match=match):
        run(_args(*argv))


@pytest.mark.e2e
def test_bench_prints_the_cost_of_each_addition_and_the_verdict(capsys, tmp_path):
    args = _args(
        "--measure", "recipe", "--epochs", "2", "--repeats", "1", "--workdir", str(tmp_path)
    )
    assert run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("per-epoch"))) :]
    names = [line.rsplit(None, 2)[0] for line in table[2:-2]]
    assert table[-2].startswith("the additions alone: +")
    assert names[0].startswith("plain fit epoch") and names[-1] == "our epoch, every default on"
    assert any(name.startswith("BatchNorm recalibration") for name in names)
    assert any(name.startswith("MLflow logging") for name in names)
    assert table[-1].startswith("total: ") and table[-1].split()[-1] in ("PASS", "MISS")


@pytest.mark.e2e
def test_bench_measures_one_and_two_logical_devices(capsys):
    args = _args("--measure", "scaling", "--size", "32", "--steps", "3", "--batch-size", "4")
    assert run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["replicas", "images/s", "speed-up", "efficiency"]
    assert [line.split()[0] for line in lines[2:]] == ["1", "2"]
    assert lines[2].split()[2:] == ["1.00x", "100%"]
