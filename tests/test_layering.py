"""The layers hold (the import-linter contract in pyproject.toml) and `tumorflow --help` stays light."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contract_is_kept():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    # every contract of pyproject.toml was checked, and kept
    assert f"{len(contracts['contracts'])} kept, 0 broken" in result.stdout


def test_cli_help_imports_no_heavy_library():
    code = (
        "import sys; from tumorflow.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'kfp', 'mlflow', 'evidently') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
