import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The example of a user's own model (examples/own_model): its folder is importable in every test.
OWN_MODEL = "mlp_moe:build"
sys.path.insert(0, str(ROOT / "examples" / "own_model"))

# Small, fast settings for end-to-end runs on synthetic data.
FAST = {
    "dataset": "synthetic",
    "dirichlet-alpha": 0.5,
    "batch-size": 32,
    "lr": 0.05,
    "fraction-train": 1.0,
    "min-train-nodes": 1,
    "fraction-evaluate": 1.0,
    "min-evaluate-nodes": 1,
    "round-timeout-s": 120.0,
}


@pytest.fixture(scope="session", autouse=True)
def _private_partition_cache(tmp_path_factory):
    """Keep the on-disk partition cache of every test (and the apps they start) private."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMOE_CACHE_DIR", str(tmp_path_factory.mktemp("fedmoe-cache")))
        yield


@pytest.fixture
def run_app(tmp_path):
    """Run the app with `flwr run` in local simulation; return (exit code, out dir, log)."""
    from fedmoe_app.tools.launch import launch

    def run(run_config, *, num_supernodes=3, run_name="e2e", timeout=420):
        cfg = {**FAST, "run-name": run_name, **run_config}
        log_path = tmp_path / f"{run_name}.log"
        with open(log_path, "w") as log:
            code = launch(
                ROOT,
                num_supernodes=num_supernodes,
                run_config=cfg,
                flwr_home=tmp_path / "flwr-home",
                output_root=tmp_path,
                timeout=timeout,
                stream_to=log,
            )
        return code, tmp_path / "outputs" / run_name, log_path.read_text()

    return run


def read_metrics(out_dir):
    return json.loads((Path(out_dir) / "metrics.json").read_text())


def text_run(run_app, folder, texts, run_config, *, num_supernodes, run_name):
    """Run the app on a folder of text files (one client per file); check it ran, return its rows.

    ``texts`` maps a file name to a sentence, written 180 times in 60 paragraphs. The run has
    two rounds unless ``run_config`` says otherwise; every round must be recorded and every
    client download less than the dense model.
    """
    folder.mkdir()
    for name, sentence in texts.items():
        (folder / name).write_text("\n\n".join(sentence * 3 for _ in range(60)), encoding="utf-8")
    cfg = {
        "dataset": "text",
        "data-dir": str(folder),
        "partitioner": "natural",
        "num-server-rounds": 2,
        "context-length": 32,
        "experts-per-client": 2,
        "capacity": "fixed",
        "max-samples-per-client": 96,
        "lr": 0.3,
        **run_config,
    }
    code, out, log = run_app(cfg, num_supernodes=num_supernodes, run_name=run_name)
    assert code == 0, log[-3000:]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == list(range(cfg["num-server-rounds"] + 1))
    assert rows[-1]["bytes_down"] < rows[-1]["dense_bytes_down"]
    return rows, out


@pytest.fixture
def serverapp_identity(monkeypatch):
    """The task identity a ServerApp process has (for ``run_server`` called in the test's process)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


#: Two rounds of a small in-process run (``run_server`` on a fake grid): every client trains 2
#: experts, no client evaluation, 32 central windows.
IN_PROCESS_RUN = {
    "partitioner": "natural",
    "num-server-rounds": 2,
    "capacity": "fixed",
    "experts-per-client": 2,
    "fraction-train": 1.0,
    "min-train-nodes": 1,
    "fraction-evaluate": 0.0,
    "min-evaluate-nodes": 0,
    "central-eval-samples": 32,
}


def write_corpus(folder):
    """Two small text files (``en.txt``, ``de.txt``: one client group each) in ``folder``; return it."""
    folder.mkdir()
    sentences = {"en.txt": "The cat sat on the mat. ", "de.txt": "Der Hund sitzt im Gras. "}
    for name, sentence in sentences.items():
        (folder / name).write_text("\n\n".join(sentence * 3 for _ in range(40)), encoding="utf-8")
    return folder


os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def make_spec(**fields):
    """The default CNN MoE on Fashion-MNIST (``REFERENCE_SPEC``) with ``fields`` changed."""
    import dataclasses

    from fedmoe_app.models import REFERENCE_SPEC

    return dataclasses.replace(REFERENCE_SPEC, **fields)


def train_args(**overrides):
    """Keyword arguments of ``training.train`` at the run config's defaults, ``overrides`` changed."""
    from fedmoe_app.config import RunConfig

    cfg = RunConfig()
    return {**cfg.train_kwargs(), "device": "cpu", "seed": cfg.seed, "max_samples": None, **overrides}


def shell_blocks(markdown):
    """Contents of the fenced ``bash``/``sh``/``shell``/``console`` blocks of a Markdown text."""
    blocks, lang, lines = [], None, []
    for line in markdown.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip() or "text", []
            else:
                if lang in ("bash", "sh", "shell", "console"):
                    blocks.append("\n".join(lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def text_split(n=48, t=16, seed=0):
    """``n`` windows of ``t + 1`` bytes of a repetitive (learnable) text, in two groups."""
    import numpy as np
    import torch

    from fedmoe_app.data.text import TextSplit

    text = np.frombuffer((b"the quick brown fox jumps over the lazy dog. " * 200), np.uint8)
    starts = np.random.default_rng(seed).integers(0, len(text) - t - 1, n)
    tokens = np.stack([text[s : s + t + 1] for s in starts])
    return TextSplit(torch.from_numpy(tokens), torch.from_numpy(np.arange(n) % 2))


# Under CI=true (.ci/run) a skipped test fails: a skip there means a tool CI should have is missing
# and hides what the test checks. Only the reasons below may skip (exactly as the test words them).
CI_ALLOWED_SKIPS = frozenset(
    {
        "no CUDA device",  # test_performance.py: CI has no GPU
    }
)


def skip_reason(report):
    """The reason a skipped report gives (``pytest.skip``, ``skipif``, ``importorskip``)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # (path, line, "Skipped: <reason>")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def fail_skip_under_ci(report):
    """Turn a skip whose reason is not in ``CI_ALLOWED_SKIPS`` into a failure when ``CI=true``."""
    if os.environ.get("CI", "").lower() != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if reason not in CI_ALLOWED_SKIPS:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {reason} (not in CI_ALLOWED_SKIPS, tests/conftest.py)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    fail_skip_under_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    fail_skip_under_ci(report)
    return report
