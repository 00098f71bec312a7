"""Local safetensors weights of a transformers MoE, read for the experts a client holds only.

Two layouts are read, in one file or a folder of shards:

* **stacked**, as ``save_file(model.state_dict())`` writes transformers 5's modules
  (``mlp.experts.gate_up_proj [E, 2h, d]``, ``mlp.experts.down_proj [E, d, h]``): the held rows
  of each stacked tensor are read from the file's bytes (:func:`read_rows`);
* **per expert**, as ``save_pretrained`` writes it and as checkpoints are published: Mixtral's
  ``block_sparse_moe.experts.<i>.w1 / w3 / w2`` and the ``mlp.experts.<i>.gate_proj /
  up_proj / down_proj`` of Qwen2-MoE, Qwen3-MoE and OLMoE. The tensors of held experts are read
  and stacked in slot order (``gate_up_proj[s] = cat(gate, up)``, transformers' own
  conversion); the others are never read.

A folder with a shard index (``model.safetensors.index.json``, as ``save_pretrained`` writes
it) is read shard by shard as the index names them; a folder without one, every
``*.safetensors`` in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

#: safetensors dtype names of the tensors :func:`read_rows` reads
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

#: one expert's tensor in the per-expert layout (after Mixtral's ``block_sparse_moe`` rename)
PER_EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")

#: per-expert part -> (stacked tensor, its half of ``gate_up_proj``'s dim 1, or 0 for ``down_proj``)
EXPERT_PARTS = {
    "w1": ("gate_up_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", 0),
    "down_proj": ("down_proj", 0),
}


def read_rows(path: Path, rows: dict[str, list[int]]) -> dict[str, Tensor]:
    """Read the tensors of ``rows`` found in the safetensors file ``path`` at those first-dim rows.

    Only the bytes of the rows are read (the format: an 8-byte little-endian header length, a
    JSON header with each tensor's dtype, shape and byte offsets, then the raw data).
    """
    out: dict[str, Tensor] = {}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        for name, ids in rows.items():
            info = header.get(name)
            if info is None or info["dtype"] not in _SAFETENSORS_DTYPES:
                continue
            shape, (start, end) = info["shape"], info["data_offsets"]
            if not shape or shape[0] == 0 or max(ids) >= shape[0]:
                continue  # load_state_dict reports the mismatch
            stride = (end - start) // shape[0]
            t = torch.empty((len(ids), *shape[1:]), dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            raw = t.view(-1).view(torch.uint8).reshape(len(ids), stride).numpy()
            for j, i in enumerate(ids):
                f.seek(8 + size + start + i * stride)
                f.readinto(memoryview(raw[j]))
            out[name] = t
    return out


class _Stacker:
    """Stack per-expert tensors into the held slots of ``gate_up_proj`` / ``down_proj``."""

    def __init__(self, rows: dict[str, list[int]]) -> None:
        self.slot_of = {name: {e: s for s, e in enumerate(ids)} for name, ids in rows.items()}
        self.stacked: dict[str, Tensor] = {}
        self.filled: dict[str, set[tuple[int, int]]] = {}

    def wants(self, m: re.Match[str]) -> tuple[str, int, int] | None:
        """``(stacked name, slot, part)`` of a per-expert tensor's name match; ``None``: not held."""
        target, part = EXPERT_PARTS[m.group(3)]
        stacked = f"{m.group(1)}.{target}"
        slot = self.slot_of.get(stacked, {}).get(int(m.group(2)))
        return None if slot is None else (stacked, slot, part)

    def put(self, where: tuple[str, int, int], t: Tensor) -> None:
        """Copy expert tensor ``t`` into its slot (and half) of the stacked tensor."""
        stacked, slot, part = where
        halves = 2 if stacked.endswith("gate_up_proj") else 1
        if stacked not in self.stacked:
            shape = (len(self.slot_of[stacked]), t.shape[0] * halves, *t.shape[1:])
            self.stacked[stacked] = torch.empty(shape, dtype=t.dtype)
            self.filled[stacked] = set()
        h = self.stacked[stacked].shape[1] // halves
        self.stacked[stacked][slot, part * h : (part + 1) * h] = t
        self.filled[stacked].add((slot, part))

    def done(self) -> tuple[dict[str, Tensor], list[str]]:
        """Return the complete stacked tensors, and the names of those missing an expert's part."""
        halves = {n: 2 if n.endswith("gate_up_proj") else 1 for n in self.stacked}
        complete = {
            n: t for n, t in self.stacked.items() if len(self.filled[n]) == len(self.slot_of[n]) * halves[n]
        }
        return complete, [n for n in self.stacked if n not in complete]


def weight_files(path: Path, weights: str, key: str = "hf-weights") -> list[Path]:
    """Return the safetensors files of ``path``: itself, a folder's indexed shards, or all of them.

    Raises
    ------
    ValueError
        Naming ``key`` (``hf-weights`` or ``hf-model``): an unreadable index, several indexes, or a
        shard it names missing.

    """
    if not path.is_dir():
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if not indexes:
        return sorted(path.glob("*.safetensors"))
    problem = f"run-config key {key!r} = {weights!r}"
    if len(indexes) > 1:
        names = [i.name for i in indexes]
        raise ValueError(f"{problem}: several shard indexes {names}; keep one checkpoint per folder")
    try:
        shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{problem}: {indexes[0].name} is not a shard index ({err})") from err
    lost = [s for s in shards if not (path / s).is_file()]
    if lost:
        raise ValueError(f"{problem}: shards named by {indexes[0].name} are missing: {lost[:5]}")
    return [path / s for s in shards]


def load_weights(
    net: nn.Module, weights: str, rows: dict[str, list[int]], num_experts: int, key: str = "hf-weights"
) -> None:
    """Load a safetensors file or a folder of shards (:func:`weight_files`) into ``net`` (strict).

    ``rows`` names each stacked expert tensor of ``net`` and the global experts of its slots
    (of ``num_experts`` per layer); only those experts are read, in either layout (module
    docstring). A model folder (``hf-model``, ``key``) is read the same way; its other files
    (config, tokenizer) are not safetensors and are left alone.

    Raises
    ------
    ValueError
        Naming ``key``: a tensor missing, left over, of another shape, or an expert held
        but absent from the files.

    """
    from safetensors import safe_open

    path = Path(weights).expanduser()
    files = weight_files(path, weights, key)
    config_key = "its config.json" if key == "hf-model" else "hf-config"
    problem = f"run-config key {key!r} = {weights!r} does not match {config_key}"
    state: dict[str, Tensor] = {}
    stacker, foreign = _Stacker(rows), []
    for f in files:
        state.update(read_rows(f, rows))
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                local = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's checkpoint name
                m = PER_EXPERT.match(local)
                if m is None:
                    if local not in state:
                        state[local] = handle.get_tensor(name)
                elif (where := stacker.wants(m)) is not None:
                    stacker.put(where, handle.get_tensor(name))
                elif int(m.group(2)) >= num_experts or f"{m.group(1)}.down_proj" not in rows:
                    foreign.append(name)  # an expert this model has not: never read, reported
    stacked, partial = stacker.done()
    state.update(stacked)
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise ValueError(f"{problem}: {err}") from err
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    unexpected = foreign + unexpected
    if missing or unexpected:
        raise ValueError(f"{problem}: missing {(partial + missing)[:5]}, unexpected {unexpected[:5]}")
