"""The package's layers hold: import-linter's contracts in pyproject.toml (imports point one way, down the layers,
and no import circle among the modules of any package) fail this test on any back-arrow."""
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_imports_point_down_the_layers():
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0
