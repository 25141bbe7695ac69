"""`tumorflow bench train`: the scaling table and a bad --replicas."""

from __future__ import annotations

import argparse

import pytest

from tumorflow.bench.train import add_arguments, run, scaling_table
from tumorflow.core.errors import ConfigError


def test_efficiency_is_throughput_against_replicas_times_one_replica():
    rows = scaling_table(
        [{"replicas": 1, "images_per_s": 100.0}, {"replicas": 2, "images_per_s": 150.0}]
    )
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["speedup"] == pytest.approx(1.5)
    assert rows[1]["efficiency"] == pytest.approx(0.75)


@pytest.mark.parametrize("replicas", ["one,two", "0,1"])
def test_bad_replica_counts_are_a_config_error(replicas):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError, match="replicas"):
        run(parser.parse_args(["--replicas", replicas]))


@pytest.mark.e2e
def test_bench_measures_one_and_two_logical_devices(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--size", "32", "--steps", "3", "--batch-size", "4"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["replicas", "images/s", "speed-up", "efficiency"]
    assert [line.split()[0] for line in lines[2:]] == ["1", "2"]
    assert lines[2].split()[2:] == ["1.00x", "100%"]
