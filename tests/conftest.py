import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
