"""The package builds as a wheel that holds the Flower components and the library API."""

import subprocess
import sys
import tomllib
import zipfile

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_wheel_holds_the_flower_components(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = tmp_path.glob("fedmoe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    for ref in app["components"].values():  # e.g. fedmoe_app.server_app:app
        module = ref.split(":")[0]
        assert module.replace(".", "/") + ".py" in names, ref
    assert {"fedmoe_app/server/strategy.py", "fedmoe_app/client/api.py"} <= names
    assert not {n.split("/")[0] for n in names} & {"tests", "docs", "examples", "deploy", "server_app.py"}
