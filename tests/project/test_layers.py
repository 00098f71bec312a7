"""The package's layers are a checked contract: imports point down only (import-linter)."""

import shutil
import subprocess
import tomllib

import pytest
from conftest import ROOT


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    res = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    names = {c["name"] for c in contracts}
    assert {"The client never imports the server, nor the server the client"} <= names
    assert "deploy" in contracts[0]["layers"]  # the deployment helpers sit above the package
    assert f"Contracts: {len(contracts)} kept, 0 broken." in res.stdout
