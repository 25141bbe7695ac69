"""`tumorflow bench route` routes every instance it stored against a real Orthanc and prints
figures that add up: each rate is the instances over its seconds, each ratio the route's rate
over the row's."""

from __future__ import annotations

import re

import pytest
from pacs import orthanc_missing

from tumorflow.cli.main import main

ROWS = ("fetch only", "decode + predict only", "route (fetch")


@pytest.mark.service  # starts its own Orthanc and model server
def test_bench_route_prints_rates_and_ratios_that_add_up(capsys):
    missing = orthanc_missing()
    if missing:
        pytest.skip(missing)
    assert main(["bench", "route", "--instances", "6", "--size", "64", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 CT instances of 64 px")
    rows = {}
    for name in ROWS:
        (line,) = [line for line in out.splitlines() if line.startswith(name)]
        seconds, rate, ratio = (float(v) for v in re.findall(r"\d+\.\d+", line)[-3:])
        # seconds are printed to the millisecond, rates to 0.1
        assert 6 / (seconds + 0.0005) - 0.05 <= rate <= 6 / max(seconds - 0.0005, 1e-9) + 0.05
        rows[name] = (rate, ratio)
    route_rate = rows["route (fetch"][0]
    assert rows["route (fetch"][1] == 1.0
    for rate, ratio in rows.values():
        low = (route_rate - 0.05) / (rate + 0.05)
        high = (route_rate + 0.05) / (rate - 0.05)
        assert low - 0.005 <= ratio <= high + 0.005
