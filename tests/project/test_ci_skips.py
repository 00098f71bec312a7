"""Under CI=true a skipped test fails, unless conftest.py allows its reason (CI_ALLOWED_SKIPS)."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import CI_ALLOWED_SKIPS

SKIPS = """
import pytest

def test_skipped_in_the_body():
    pytest.skip("tool A is missing")

@pytest.mark.skipif(True, reason="tool B is missing")
def test_skipped_by_a_mark():
    pass

@pytest.fixture
def needs_c():
    pytest.skip("tool C is missing")

def test_skipped_by_a_fixture(needs_c):
    pass

@pytest.mark.xfail(reason="known bug")
def test_expected_to_fail():
    assert False

def test_passes():
    pass
"""
MODULE_SKIP = 'import pytest\n\npytest.importorskip("no_such_module_fedmoe")\n\ndef test_x():\n    pass\n'
ALLOWED = 'import pytest\n\n@pytest.mark.skipif(True, reason="no CUDA device")\ndef test_gpu():\n    pass\n'


def run_pytest(tmp_path, files, ci):
    """Run pytest on ``files`` (name -> source) beside a copy of tests/conftest.py; return (code, output)."""
    folder = tmp_path / f"session-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    for name, source in {
        "conftest.py": (Path(__file__).parents[1] / "conftest.py").read_text(),
        **files,
    }.items():
        (folder / name).write_text(source)
    (folder / "pytest.ini").write_text("[pytest]\n")  # rootdir here, not the repository's settings
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    args = ["-q", "-rfs", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", *args], cwd=folder, env=env, capture_output=True, text=True
    )
    return out.returncode, out.stdout + out.stderr


def test_a_skip_fails_under_ci_naming_its_reason(tmp_path):
    code, log = run_pytest(tmp_path, {"test_skips.py": SKIPS, "test_module_skip.py": MODULE_SKIP}, "true")
    assert code == 1, log
    for reason in ("tool A", "tool B", "tool C", "could not import 'no_such_module_fedmoe'"):
        assert f"skipped under CI=true: {reason}" in log, (reason, log)
    # a skip in the test's setup (mark, fixture) or collection (module) fails as an error
    assert "1 failed, 1 passed, 1 xfailed, 3 errors" in log, log


def test_a_skip_passes_outside_ci_and_an_allowed_reason_passes_under_ci(tmp_path):
    files = {"test_skips.py": SKIPS, "test_module_skip.py": MODULE_SKIP, "test_allowed.py": ALLOWED}
    for ci in (None, "false"):
        code, log = run_pytest(tmp_path, files, ci)
        assert code == 0 and "1 passed, 5 skipped, 1 xfailed" in log, log
    assert "no CUDA device" in CI_ALLOWED_SKIPS
    code, log = run_pytest(tmp_path, {"test_allowed.py": ALLOWED}, "true")
    assert code == 0 and "1 skipped" in log and "no CUDA device" in log, log


def test_ci_runs_pytest_under_ci_true_with_the_fortunes_packages_installed():
    root = Path(__file__).resolve().parents[2]
    ci = (root / ".ci" / "run").read_text()
    assert ci.index("export CI=true") < ci.index(".venv/bin/python -m pytest")
    setup = (root / "scripts" / "setup.sh").read_text()
    fortunes = "fortunes fortunes-de fortunes-ru fortunes-zh fortunes-es fortunes-it fortunes-pl fortunes-cs"
    assert f"for pkg in {fortunes}; do" in setup and 'apt_install "${missing[@]}"' in setup
