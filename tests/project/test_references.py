"""Every file the docs and the code point to exists, and every module path they name imports."""

import importlib.util
import re

from conftest import ROOT

TOP = ("fedmoe_app", "docs", "tests", "scripts", "deploy", "docker", ".ci")
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOP) + r")/[\w./-]*[\w/])")
MODULE = re.compile(r"(?<![\w.])(fedmoe_app(?:\.[a-z_]+)+)")


def sources():
    for pattern in (
        "*.md",
        "docs/*.md",
        "fedmoe_app/**/*.py",
        "tests/*.py",
        "deploy/*.py",
        "scripts/*",
        "docker/*",
    ):
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file() and path.suffix != ".png":
                yield path, path.read_text(errors="replace")


def ignored():
    """Exact paths .gitignore names: files a user or a tool writes (docker/build-ca.crt)."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith(("#", "!"))}


def test_every_file_path_mentioned_exists():
    missing, skip = [], ignored()
    for path, text in sources():
        for match in PATH.finditer(text):
            if text[match.end() : match.end() + 1] in ("[", "\\"):
                continue  # a glob (build-ca.cr[t]) or a regular expression, not a path
            ref = match.group(1).rstrip(".")  # docker/certs: written by deploy/certs.py, never committed
            if "<" in ref or "*" in ref or ref.startswith(("outputs/", "docker/certs")) or ref in skip:
                continue
            if not (ROOT / ref).exists():
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert missing == []


def test_every_module_path_mentioned_imports():
    missing = []
    for path, text in sources():
        for ref in set(MODULE.findall(text)):
            # a dotted name may end in an attribute (fedmoe_app.tools.launch.launch): find its module
            parts = ref.split(".")
            if not any(_importable(".".join(parts[:n])) for n in range(len(parts), 1, -1)):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert missing == []


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError):  # a parent is a module, not a package
        return False
