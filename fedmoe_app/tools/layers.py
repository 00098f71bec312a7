"""Draw the package's layers from the code: its modules, layer by layer, and who imports whom.

``fedmoe-layers docs/layers.png`` (or ``python -m fedmoe_app.tools.layers``) reads the layer
order from the import-linter contract in ``pyproject.toml``, the modules from the package and
the imports between them from ``grimp`` (import-linter's graph builder), and draws one band
per layer with its modules and one arrow per pair of packages that import each other, labelled
with the number of module-level imports. docs/ARCHITECTURE.md shows the picture.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import grimp

PACKAGE = "fedmoe_app"
REPO_ROOT = Path(__file__).resolve().parents[2]


def contract_layers(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[list[str]]:
    """Return the import-linter ``layers`` contract's layers, top first; each a list of packages."""
    config = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    return [[p.strip() for p in layer.split("|")] for layer in contract["layers"]]


def package_of(module: str, packages: Sequence[str]) -> str | None:
    """Return the layer package ``module`` belongs to (None outside every layer)."""
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def layer_model(graph: grimp.ImportGraph, layers: list[list[str]]) -> tuple[dict[str, list[str]], Counter]:
    """Return the modules of each layer package and the import counts between packages.

    Returns
    -------
    modules : dict
        Layer package -> its modules, names relative to the package (``""`` for a module
        that is the package itself).
    edges : Counter
        ``(importer package, imported package)`` -> number of module-level imports.

    """
    packages = [p for layer in layers for p in layer]
    modules: dict[str, list[str]] = {p: [] for p in packages}
    for module in sorted(graph.modules):
        owner = package_of(module, packages)
        if owner is not None:
            modules[owner].append(module[len(owner) + 1 :] if module != owner else "")
    edges: Counter = Counter()
    for module in graph.modules:
        src = package_of(module, packages)
        for imported in graph.find_modules_directly_imported_by(module):
            dst = package_of(imported, packages)
            if src and dst and src != dst:
                edges[src, dst] += 1
    return modules, edges


def draw(layers: list[list[str]], modules: dict[str, list[str]], edges: Counter, out: Path) -> Path:
    """Draw the layer picture to ``out`` (PNG or SVG, by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    band_h, gap, width = 1.0, 0.55, 12.0
    fig_h = len(layers) * (band_h + gap) + 0.4
    fig, ax = plt.subplots(figsize=(width, fig_h))
    centers: dict[str, tuple[float, float]] = {}
    for row, layer in enumerate(layers):
        y = fig_h - 0.4 - (row + 1) * (band_h + gap) + gap
        box_w = (width - 0.4 * (len(layer) + 1)) / len(layer)
        for col, pkg in enumerate(layer):
            x = 0.4 + col * (box_w + 0.4)
            ax.add_patch(
                FancyBboxPatch((x, y), box_w, band_h, boxstyle="round,pad=0.02", fc="#eef3fb", ec="#345")
            )
            ax.text(x + 0.1, y + band_h - 0.22, pkg.removeprefix(PACKAGE + "."), fontsize=10, weight="bold")
            names = sorted({m.split(".")[0] + ("/" if "." in m else "") for m in modules[pkg] if m})
            names = [n for n in names if n.rstrip("/") + "/" not in names or n.endswith("/")] or ["(module)"]
            per_line = max(10, int(box_w * 17))  # characters of 6.5 pt text that fit the box's width
            label = textwrap.fill("  ".join(names), per_line, break_on_hyphens=False)
            ax.text(x + 0.1, y + 0.08, label, fontsize=6.5, va="bottom", linespacing=1.1)
            centers[pkg] = (x + box_w / 2, y + band_h / 2)
    packages = list(centers)
    for (src, dst), count in sorted(edges.items()):
        (x0, y0), (x1, y1) = centers[src], centers[dst]
        x0 += 0.25 * (packages.index(dst) - len(packages) / 2)  # fan out: one lane per pair
        x1 += 0.25 * (packages.index(src) - len(packages) / 2)
        upward = y1 > y0
        ax.annotate(
            "",
            xy=(x1, y1 + (-band_h / 2 if upward else band_h / 2)),
            xytext=(x0, y0 + (band_h / 2 if upward else -band_h / 2)),
            arrowprops={"arrowstyle": "->", "color": "#c22" if upward else "#789", "lw": 0.6 + 0.1 * count},
        )
    ax.set_xlim(0, width)
    ax.set_ylim(0, fig_h)
    ax.axis("off")
    ax.set_title("fedmoe_app layers (imports point down; drawn from the code by fedmoe-layers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    """Return the command line's parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out", nargs="?", default=str(REPO_ROOT / "docs" / "layers.png"), help="PNG or SVG file"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write the picture and print the layers with their modules."""
    args = build_parser().parse_args(argv)
    layers = contract_layers()
    modules, edges = layer_model(grimp.build_graph(PACKAGE), layers)
    draw(layers, modules, edges, Path(args.out))
    for layer in layers:
        print(" | ".join(f"{p}: {', '.join(m or '(module)' for m in modules[p])}" for p in layer))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
