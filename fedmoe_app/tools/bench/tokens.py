"""Benchmark ``tokens``: training tokens/s of ``transformer-moe`` in the app's loop vs a plain loop.

Usage::

    python -m fedmoe_app.tools.bench tokens [--windows 1024] [--batch-size 16] [--experts 2]
                                            [--repeats 3] [--device auto] [--threads 0]

Both sides train the same sub-model (``--experts`` held of ``num-experts``, the run
config's defaults otherwise) for one epoch over the same windows of random bytes in the
same batch order:

* **app**: :func:`fedmoe_app.training.train`, the loop a client runs (feedback sums on the
  device, the Switch balance loss, fused SGD where torch has it);
* **plain**: the loop a PyTorch user would write: forward, cross-entropy + the balance
  loss, ``zero_grad``, ``backward``, ``torch.optim.SGD`` step.

It prints tokens/s of each (median over ``--repeats``, sides alternating) and the ratio
plain / app (criterion: <= 1.25). Tokens are predicted bytes: windows x context length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch

from fedmoe_app.config import RunConfig
from fedmoe_app.data.text import TextSplit
from fedmoe_app.models import TransformerSpec, build_model
from fedmoe_app.training import resolve_device, train

from .common import machine_summary, set_threads


def _spec(args: argparse.Namespace) -> TransformerSpec:
    cfg = replace(RunConfig(), model="transformer-moe", dataset="fortunes")
    spec = TransformerSpec.from_config(cfg, argparse.Namespace(vocab_size=256))
    return replace(spec, context_length=args.context_length)


def _windows(spec: TransformerSpec, n: int) -> TextSplit:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (n, spec.context_length + 1), generator=gen, dtype=torch.uint8)
    return TextSplit(tokens, torch.zeros(n, dtype=torch.long))


def app_tokens_per_s(spec: TransformerSpec, data: TextSplit, args: argparse.Namespace) -> float:
    """Tokens/s of one epoch of :func:`fedmoe_app.training.train` on ``data``."""
    model = build_model(spec, list(range(args.experts)), seed=0)
    knobs = RunConfig().train_kwargs() | {"epochs": 1, "batch_size": args.batch_size}
    res = train(model, data, **knobs, device=resolve_device(args.device), seed=0, max_samples=None)
    return res.num_examples * spec.context_length / res.train_time_s


def plain_tokens_per_s(spec: TransformerSpec, data: TextSplit, args: argparse.Namespace) -> float:
    """Tokens/s of the same epoch as a plain PyTorch loop (same batches, same model)."""
    cfg = RunConfig()
    device = resolve_device(args.device)
    model = build_model(spec, list(range(args.experts)), seed=0).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    tokens = data.tokens.to(device)
    x_all, y_all = tokens[:, :-1], tokens[:, 1:]
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    for i in range(0, len(order), args.batch_size):
        idx = order[i : i + args.batch_size]
        x, y = x_all.index_select(0, idx), y_all.index_select(0, idx).long()
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, spec.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + cfg.aux_loss_weight * out.aux_loss).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(data) * spec.context_length / (time.perf_counter() - start)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``tokens`` to ``parser``, its ``argparse`` subparser."""
    parser.add_argument("--windows", type=int, default=1024, help="training windows per epoch")
    parser.add_argument("--context-length", type=int, default=64, help="bytes per window")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--experts", type=int, default=2, help="experts the client holds")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per side (median)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def bench_tokens(args: argparse.Namespace) -> int:
    """Print tokens/s of the app's training loop and of a plain loop, and their ratio.

    Parameters
    ----------
    args : argparse.Namespace
        See :func:`add_arguments`.

    Returns
    -------
    int
        Exit status (0; the verdict on the 1.25 criterion is printed, not returned).

    """
    threads = set_threads(args.threads)
    spec = _spec(args)
    data = _windows(spec, args.windows)
    out = sys.stdout
    out.write(
        f"# tokens benchmark: transformer-moe {spec}, holding {args.experts} experts, "
        f"{args.windows} windows, batch {args.batch_size}, device {resolve_device(args.device)}, "
        f"{threads} threads\n# machine: {machine_summary()}\n"
    )
    plain_tokens_per_s(spec, _windows(spec, 2 * args.batch_size), args)  # warm-up (kernels, allocator)
    app, plain = [], []
    for _ in range(args.repeats):
        app.append(app_tokens_per_s(spec, data, args))
        plain.append(plain_tokens_per_s(spec, data, args))
    a, p = statistics.median(app), statistics.median(plain)
    verdict = "meets" if p / a <= 1.25 else "MISSES"
    out.write(
        f"app   tokens/s: {a:10.0f}  (runs: {', '.join(f'{v:.0f}' for v in app)})\n"
        f"plain tokens/s: {p:10.0f}  (runs: {', '.join(f'{v:.0f}' for v in plain)})\n"
        f"app time / plain time: {p / a:.3f} ({verdict} <= 1.25)\n"
    )
    return 0
