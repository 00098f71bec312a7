"""``fedmoe-plan``: a dry run of federating a real MoE language model, from its config.json alone.

``fedmoe-plan --hf-config mixtral/config.json --clients 10 --device-mix "phone=0.5,laptop=0.3,edge=0.2"``

prints one JSON document: the model's parameters (total, active per token, shared, experts and
their share) and, per device class of the federation, the experts a client plans to hold (the
app's own capacity planning, :func:`fedmoe_app.capacity.plan.plan_federation`), the bytes it
downloads in the wire dtype and its predicted peak training memory; with ``--peft lora`` the
experts are planned, and the peak predicted, with LoRA's memory model (frozen base, trained
adapters) and the downloads are the adapters; ``--optimizer adamw`` prices Adam's two states
per trained parameter (SGD momentum: one). Nothing is downloaded and no
weight is allocated: parameters are counted on the meta device and FLOPs and activations on
fake-tensor twins (:mod:`fedmoe_app.models.hf_costs`), so a 47B-parameter model plans in well
under a minute and 2 GB (docs/CAPACITY.md). Defaults are the run config's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..capacity import Adapters, parse_device_mix
from ..capacity.plan import WIRE_BYTES, plan_federation
from ..config import OPTIMIZER_STATES, RunConfig
from ..hf_config import HF_MOE_TYPES, hf_shape, moe_layers


def read_model_config(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Return the config dict named by ``--hf-config`` or ``--hf-model`` and that flag.

    Raises
    ------
    ValueError
        Naming the flag: a missing or unreadable file, or a config that is not a supported MoE.

    """
    flag, value = ("--hf-config", args.hf_config) if args.hf_config else ("--hf-model", args.hf_model)
    path = Path(value).expanduser()
    if flag == "--hf-model":
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag} {value!r} is invalid: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {value!r} is invalid: not a JSON object")
    model_type = config.get("model_type")
    if model_type not in HF_MOE_TYPES:
        raise ValueError(
            f"{flag} {value!r} is invalid: model_type {model_type!r} is not a supported MoE causal LM; "
            f"allowed: {', '.join(HF_MOE_TYPES)}"
        )
    from ..models.hf_costs import fill_defaults

    config = fill_defaults(config)
    try:
        hf_shape(config, value)
    except ValueError as exc:
        raise ValueError(f"{flag} {value!r} is invalid: {str(exc).split(' is invalid: ')[-1]}") from None
    return config, flag


def default_wire_dtype(config: dict[str, Any]) -> str:
    """``bf16`` when the config's ``torch_dtype`` (or ``dtype``) is bfloat16, else ``fp32``."""
    dtype = str(config.get("torch_dtype", config.get("dtype", "")))
    return "bf16" if dtype.removeprefix("torch.") == "bfloat16" else "fp32"


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; defaults are the run config's (``RunConfig``)."""
    d = RunConfig.from_run_config({})
    p = argparse.ArgumentParser(prog="fedmoe-plan", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-config", help="a config.json of a mixtral, qwen2_moe, qwen3_moe or olmoe model")
    src.add_argument("--hf-model", help="a save_pretrained folder (only its config.json is read)")
    p.add_argument("--clients", type=int, default=10, help="clients of the federation (default 10)")
    p.add_argument(
        "--device-mix", default=d.device_mix, help="as run-config device-mix; empty: fixed capacity"
    )
    p.add_argument("--experts-per-client", type=int, default=d.experts_per_client)
    p.add_argument("--context-length", type=int, default=d.context_length)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed, help="the run's seed (which client plays which class)")
    p.add_argument("--wire-dtype", choices=list(WIRE_BYTES), help="default: bf16 if the config's dtype is")
    p.add_argument(
        "--optimizer", choices=list(OPTIMIZER_STATES), default=d.optimizer, help="the clients' optimizer"
    )
    p.add_argument("--peft", choices=["none", "lora"], default="none")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument(
        "--lora-target-modules", default=d.lora_target_modules, help="comma-separated module-name suffixes"
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (:func:`build_parser`)."""
    return build_parser().parse_args(argv)


def check_numbers(args: argparse.Namespace, config: dict[str, Any], num_experts: int) -> None:
    """Raise ValueError naming the flag for a number out of range."""
    positions = int(config.get("max_position_embeddings", args.context_length))
    bounds = {
        "--clients": (args.clients, 1, None),
        "--experts-per-client": (args.experts_per_client, 1, num_experts),
        "--context-length": (args.context_length, 1, positions),
        "--batch-size": (args.batch_size, 1, None),
        "--lora-rank": (args.lora_rank, 1, None),
    }
    for flag, (value, lo, hi) in bounds.items():
        if value < lo or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else f"{lo}..{hi}"
            raise ValueError(f"{flag} {value} is invalid; allowed: {allowed}")


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """Return the plan document of the parsed arguments (see the module docstring)."""
    from ..models.hf_costs import hf_costs, lora_param_counts, param_counts
    from ..models.hf_spec import HFSpec

    config, _ = read_model_config(args)
    num_experts, top_k = hf_shape(config, "")
    check_numbers(args, config, num_experts)
    mix = parse_device_mix(args.device_mix)
    wire = args.wire_dtype or default_wire_dtype(config)
    spec = HFSpec(
        config_json=json.dumps(config, sort_keys=True),
        weights="",
        num_experts=num_experts,
        top_k=top_k,
        context_length=args.context_length,
        num_moe_layers=moe_layers(config),
        vocab_size=int(config.get("vocab_size", 0)),
    )
    params = param_counts(config)
    costs = hf_costs(spec)
    adapters = None
    if args.peft == "lora":
        shared, expert = lora_param_counts(config, args.lora_rank, args.lora_target_modules.split(","))
        adapters = Adapters(args.lora_rank, shared, expert)
    classes = plan_federation(
        costs,
        batch_size=args.batch_size,
        experts_per_client=args.experts_per_client,
        clients=args.clients,
        mix=mix,
        seed=args.seed,
        wire_dtype=wire,
        adapters=adapters,
        optimizer_states=OPTIMIZER_STATES[args.optimizer],
    )
    experts_all = num_experts * params.expert
    doc: dict[str, Any] = {
        "model_type": config["model_type"],
        "num_layers": int(config["num_hidden_layers"]),
        "moe_layers": spec.num_moe_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "total_params": params.total,
        "active_params": params.unique_shared + top_k * params.expert,
        "shared_params": params.unique_shared,
        "expert_params": experts_all,
        "params_per_expert": params.expert,
        "expert_share": experts_all / params.total,
        "wire_dtype": wire,
        "wire_shared_values": costs.shared_params,
        "peft": args.peft,
        "optimizer": args.optimizer,
        "context_length": args.context_length,
        "batch_size": args.batch_size,
        "clients": args.clients,
        "device_mix": mix,
        "experts_per_client": args.experts_per_client,
        "training_flops_per_sequence": {"shared": costs.flops_shared, "top_k_experts": costs.flops_experts},
        "activation_bytes_per_sequence": {
            "fixed": 4 * costs.fixed_activation_values + costs.fixed_activation_bytes,
            "routed_per_visited_expert": 4 * costs.routed_activation_values,
        },
        "device_classes": classes,
    }
    if adapters is not None:
        doc["lora"] = {
            "rank": adapters.rank,
            "target_modules": args.lora_target_modules,
            "shared_adapter_params": adapters.shared,
            "adapter_params_per_expert": adapters.expert,
            "note": (
                "the base model is assumed on every device: download_bytes are the adapters' only; "
                "experts_per_client and peak_memory_bytes are LoRA's (frozen base, merged experts, "
                "trained adapters)"
            ),
        }
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan as one JSON document; exit 2 with the flag named on a bad input."""
    args = parse_args(argv)
    try:
        doc = plan(args)
    except ValueError as exc:
        print(f"fedmoe-plan: error: {exc}", file=sys.stderr)
        return 2
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
