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

The files are not trusted: a shard must lie inside its folder (no ``..``, no absolute path, no
link out), every header is checked (:func:`read_header`: its length against the file, each
tensor's dtype, shape and byte range against the file and each other) before a byte of a tensor
is read or allocated, only floating-point tensors are accepted, and a tensor's shape is checked
against the model's before it is read. Every error names the run-config key, the file and the
tensor.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

#: safetensors dtype names of the tensors a model's weights may have (floating point)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
#: bytes per value of every dtype the safetensors format names (to check byte ranges)
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2}
_ITEM_BYTES |= {"BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: the longest JSON header the safetensors library itself accepts
HEADER_LIMIT = 100_000_000


class WeightsError(ValueError):
    """A weights file that cannot be used: outside its folder, malformed, or not this model's."""


def read_header(path: Path, problem: str) -> tuple[int, dict[str, dict]]:
    """Return a safetensors file's data offset and its header, every entry checked against the file.

    The header length must fit the file and :data:`HEADER_LIMIT`; every tensor needs a known
    floating-point dtype, a shape of non-negative integers and a byte range inside the data whose
    length is its shape's; nothing is allocated from the header's claims before that.

    Raises
    ------
    WeightsError
        ``problem`` (the run-config key and value), the file and the tensor at fault.

    """
    size = path.stat().st_size
    where = f"{problem}: {path}"
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < length <= min(HEADER_LIMIT, size - 8):
            raise WeightsError(f"{where}: header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError) as err:
            raise WeightsError(f"{where}: the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{where}: the header is not a JSON object")
    data = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{where}: tensor {name!r} has no dtype, shape and data_offsets") from None
        if dtype not in _SAFETENSORS_DTYPES:
            allowed = sorted(_SAFETENSORS_DTYPES)
            raise WeightsError(f"{where}: tensor {name!r} is {dtype!r}; allowed: floating point {allowed}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise WeightsError(f"{where}: tensor {name!r} has shape {shape!r}; allowed: whole numbers >= 0")
        if not all(type(x) is int for x in (begin, end)) or not 0 <= begin <= end <= data:
            raise WeightsError(f"{where}: tensor {name!r} spans bytes {begin}..{end} of a {data}-byte body")
        if end - begin != math.prod(shape) * _ITEM_BYTES[dtype]:
            raise WeightsError(
                f"{where}: tensor {name!r} of shape {shape} ({dtype}) cannot span {end - begin} bytes"
            )
    return 8 + length, header


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


def read_rows(
    path: Path,
    rows: dict[str, list[int]],
    problem: str,
    shapes: dict[str, tuple[int, ...]] | None = None,
    header: tuple[int, dict[str, dict]] | None = None,
) -> dict[str, Tensor]:
    """Read the tensors of ``rows`` found in the safetensors file ``path`` at those first-dim rows.

    Only the bytes of the rows are read (the format: an 8-byte little-endian header length, a
    JSON header with each tensor's dtype, shape and byte offsets, then the raw data), after the
    header is checked (:func:`read_header`, or given as it returned it) and, where ``shapes``
    gives a tensor's shape in the model, its rows' shape against it; errors start with ``problem``.
    """
    out: dict[str, Tensor] = {}
    body, entries = header if header is not None else read_header(path, problem)
    with open(path, "rb") as f:
        for name, ids in rows.items():
            info = entries.get(name)
            if info is None:
                continue
            shape, (start, end) = info["shape"], info["data_offsets"]
            if not shape or shape[0] == 0 or max(ids) >= shape[0]:
                continue  # load_state_dict reports the mismatch
            want = (shapes or {}).get(name)
            if want is not None and tuple(shape[1:]) != tuple(want[1:]):
                raise WeightsError(
                    f"{problem}: {path}: tensor {name!r} has rows of shape {tuple(shape[1:])}, "
                    f"the model's are {tuple(want[1:])}"
                )
            stride = (end - start) // shape[0]
            t = torch.empty((len(ids), *shape[1:]), dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            raw = t.view(-1).view(torch.uint8).reshape(len(ids), stride).numpy()
            for j, i in enumerate(ids):
                f.seek(body + start + i * stride)
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
    problem = f"run-config key {key!r} = {weights!r}"
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if not indexes:
        return [_inside(path, f.name, problem, "the folder") for f in sorted(path.glob("*.safetensors"))]
    if len(indexes) > 1:
        names = [i.name for i in indexes]
        raise ValueError(f"{problem}: several shard indexes {names}; keep one checkpoint per folder")
    try:
        shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{problem}: {indexes[0].name} is not a shard index ({err})") from err
    if not all(isinstance(s, str) for s in shards):
        raise ValueError(f"{problem}: {indexes[0].name} names shards that are not file names")
    files = [_inside(path, s, problem, indexes[0].name) for s in shards]
    lost = [s for s, f in zip(shards, files, strict=True) if not f.is_file()]
    if lost:
        raise ValueError(f"{problem}: shards named by {indexes[0].name} are missing: {lost[:5]}")
    return files


def _inside(folder: Path, name: str, problem: str, named_by: str) -> Path:
    """Return ``folder / name`` if it is a plain relative name that stays inside ``folder`` (links too)."""
    candidate = folder / name
    if Path(name).is_absolute() or ".." in Path(name).parts or not _resolves_inside(candidate, folder):
        raise WeightsError(f"{problem}: {named_by} names {name!r}, which is outside {folder}")
    return candidate


def _resolves_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (following links) resolves to a place inside ``folder``."""
    return path.resolve().is_relative_to(folder.resolve())


def _part_shape(model: dict[str, tuple[int, ...]], stacked: str) -> tuple[int, ...] | None:
    """Shape of one expert's part (``gate``, ``up`` or ``down``) of the model's stacked tensor."""
    shape = model.get(stacked)
    if shape is None:
        return None
    halves = 2 if stacked.endswith("gate_up_proj") else 1
    return (shape[1] // halves, *shape[2:])


def _check_shape(shape: list[int], want: tuple[int, ...] | None, where: str, name: str) -> None:
    """Raise :class:`WeightsError` if a file's tensor has another shape than the model's (known) one."""
    if want is not None and tuple(shape) != tuple(want):
        raise WeightsError(f"{where}: tensor {name!r} has shape {tuple(shape)}, the model's is {tuple(want)}")


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
    model = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    source = f"run-config key {key!r} = {weights!r}"
    for f in files:
        checked = read_header(f, source)  # (data offset, entries): checked before anything is read
        entries = checked[1]
        state.update(read_rows(f, rows, problem, model, checked))
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                local = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's checkpoint name
                m = PER_EXPERT.match(local)
                if m is None:
                    if local not in state:
                        _check_shape(entries[name]["shape"], model.get(local), f"{problem}: {f}", name)
                        state[local] = handle.get_tensor(name)
                elif (where := stacker.wants(m)) is not None:
                    _check_shape(
                        entries[name]["shape"], _part_shape(model, where[0]), f"{problem}: {f}", name
                    )
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
