"""``fedmoe-export RUN_DIR [--out FOLDER]``: a run's global model as a standard folder.

Reads the run folder (its ``config.json``, ``model_spec.json``, ``final_model.npz`` or last
``checkpoint.npz``, ``metrics.json``) and writes ``FOLDER`` (default ``RUN_DIR/export``):
for ``model = "hf"`` a transformers ``save_pretrained`` folder that
``AutoModelForCausalLM.from_pretrained`` loads (with the tokenizer of ``hf-model``, if it names
a folder); for ``cnn-moe`` / ``transformer-moe`` ``model.safetensors`` and
``fedmoe_model.json`` (``fedmoe_app.models.load_exported`` loads it); both with
``fedmoe_export.json`` and a ``README.md``. See :mod:`fedmoe_app.run.export`. Prints the folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..run.export import EXPORT_DIR, export_run


def build_parser() -> argparse.ArgumentParser:
    """Return the command line of ``fedmoe-export``."""
    parser = argparse.ArgumentParser(prog="fedmoe-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder, outputs/<run-name>")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"folder to write (default: RUN_DIR/{EXPORT_DIR})"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: export the run's global model; print the folder written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
