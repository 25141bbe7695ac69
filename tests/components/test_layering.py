"""The step modules are plain functions: no KFP inside them, and `tumorflow --help` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

COMPONENTS = Path(__file__).resolve().parents[2] / "components"


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in COMPONENTS.glob("*.py")))
def test_step_modules_never_import_kfp(module):
    assert "kfp" not in _imported_modules(COMPONENTS / module)


def test_cli_help_imports_no_heavy_library():
    code = (
        "import sys; from tumorflow.pipelines.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'kfp', 'mlflow', 'evidently') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
