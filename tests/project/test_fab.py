"""The FAB ``flwr build`` makes of this app: code only, small enough to ship to every SuperNode."""

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT

MAX_FAB_BYTES = 1_000_000  # Flower refuses FABs over 10 MB; results, docs and the tools stay out of it


def test_the_fab_holds_the_apps_and_the_package_only_under_1_mb(tmp_path):
    flwr = Path(sys.executable).with_name("flwr")
    done = subprocess.run(
        [str(flwr), "build", "--app", str(ROOT)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert fab.stat().st_size < MAX_FAB_BYTES, (fab.stat().st_size, sorted(names)[:20])
    assert {"fedmoe_app/server_app.py", "fedmoe_app/client_app.py", "pyproject.toml"} <= set(names)
    assert "fedmoe_app/server/strategy.py" in names and "fedmoe_app/client/handlers.py" in names
    top = {n.split("/")[0] for n in names}
    assert not top & {"docs", "tests", "deploy", "docker", "scripts", "examples"}, sorted(top)
    assert not any(n.startswith("fedmoe_app/tools/") for n in names)  # command-line tools only
