"""The server's initial global model read from an ``hf`` checkpoint, tensor by tensor, in its own dtype.

The model is never built: its names and shapes come from a skeleton on the meta device, and every
tensor is read from the safetensors files (:func:`~.hf_weights.weight_files`) as raw bytes, as
:func:`~.hf_weights.read_rows` reads a client's rows, into numpy: ``F32`` as float32, ``BF16`` as
``ml_dtypes.bfloat16`` (a bf16 checkpoint of ``N`` bytes is held in ``N`` bytes), ``F16`` and
``F64`` upcast/downcast to float32. Names follow :func:`~.arrays.model_to_arrays`: a shared tensor
is ``"net." +`` its transformers state name (Mixtral's ``block_sparse_moe`` read as ``mlp``); an
expert's tensors are ``experts.<i>.<suffix>``, taken from the stacked layout a slice at a time or
from the per-expert layout (``w1``/``w3``/``w2`` or ``gate_proj``/``up_proj``/``down_proj``,
``gate_up = cat(gate, up)`` as transformers converts them).
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from ..tensors import Arrays, expert_key
from .arrays import global_shapes
from .hf_spec import HFSpec
from .hf_weights import EXPERT_PARTS, PER_EXPERT, read_header, weight_files
from .interface import expert_suffix

#: safetensors dtype -> (numpy dtype of its bytes, numpy dtype kept)
_DTYPES = {
    "F32": (np.dtype(np.float32), np.dtype(np.float32)),
    "BF16": (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.bfloat16)),
    "F16": (np.dtype(np.float16), np.dtype(np.float32)),
    "F64": (np.dtype(np.float64), np.dtype(np.float32)),
}


def hf_global_shapes(spec: HFSpec) -> dict[str, tuple[int, ...]]:
    """Global names and shapes of ``spec``'s model holding every expert, built on the meta device."""
    from dataclasses import replace

    from .hf import HFMoE

    with torch.device("meta"):
        model = HFMoE(replace(spec, weights=""))
    return global_shapes(model)


def _read(f, start: int, nbytes: int, shape: list[int], stored: np.dtype, kept: np.dtype) -> np.ndarray:
    raw = np.empty(nbytes, dtype=np.uint8)
    f.seek(start)
    f.readinto(memoryview(raw))
    value = raw.view(stored).reshape(shape)
    return value if stored == kept else value.astype(kept)


def hf_global_arrays(spec: HFSpec) -> Arrays:
    """Return ``model_to_arrays(build_model(spec))``'s tensors read from ``spec.weights`` (module docstring).

    Raises
    ------
    ValueError
        Naming ``spec.weights_key``: a tensor of an unsupported dtype or another shape, one missing
        from the files, or one the model has not.

    """
    shapes = hf_global_shapes(spec)
    problem = f"run-config key {spec.weights_key!r} = {spec.weights!r}"
    out: Arrays = {}
    parts: dict[str, set[int]] = {}  # per-expert layout: the parts of gate_up / down read so far
    for path in weight_files(Path(spec.weights).expanduser(), spec.weights, spec.weights_key):
        body, header = read_header(path, problem)  # every entry checked against the file
        with open(path, "rb") as f:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                stored, kept = _DTYPES[info["dtype"]]
                shape, (begin, end) = info["shape"], info["data_offsets"]
                start = body + begin
                where = f"{problem}: {path}: tensor {name!r}"
                local = name.replace(".block_sparse_moe.", ".mlp.")
                m = PER_EXPERT.match(local)
                if m is not None:
                    target, part = EXPERT_PARTS[m.group(3)]
                    key = expert_key(int(m.group(2)), expert_suffix(f"net.{m.group(1)}.{target}"))
                    want = shapes.get(key)
                    if want is None:
                        raise ValueError(f"{where} is not a tensor of this model")
                    half = want[0] // (2 if target == "gate_up_proj" else 1)
                    if tuple(shape) != (half, *want[1:]):
                        raise ValueError(f"{where} has shape {tuple(shape)}, expected {(half, *want[1:])}")
                    if key not in out:
                        out[key] = np.empty(want, dtype=kept)
                    out[key][part * half : (part + 1) * half] = _read(
                        f, start, end - begin, shape, stored, kept
                    )
                    parts.setdefault(key, set()).add(part)
                elif f"net.{local}" in shapes:
                    if tuple(shape) != shapes[f"net.{local}"]:
                        raise ValueError(
                            f"{where} has shape {tuple(shape)}, expected {shapes[f'net.{local}']}"
                        )
                    out[f"net.{local}"] = _read(f, start, end - begin, shape, stored, kept)
                elif local.split(".")[-2:-1] == ["experts"]:  # stacked layout: one expert at a time
                    suffix = expert_suffix(f"net.{local}")
                    stride = (end - begin) // max(shape[0], 1)
                    for e in range(shape[0]):
                        key = expert_key(e, suffix)
                        if key not in shapes:
                            raise ValueError(f"{where} has expert {e}, which this model has not")
                        if tuple(shape[1:]) != shapes[key]:
                            raise ValueError(
                                f"{where} has experts of shape {tuple(shape[1:])}, expected {shapes[key]}"
                            )
                        out[key] = _read(f, start + e * stride, stride, shape[1:], stored, kept)
                elif not local.endswith("rotary_emb.inv_freq"):
                    raise ValueError(f"{where} is not a tensor of this model")
    for key, got in parts.items():  # gate_up needs both halves
        if len(got) < (2 if key.endswith("gate_up_proj") else 1):
            del out[key]
    tied = "net.lm_head.weight"
    if tied in shapes and tied not in out and spec.config.get("tie_word_embeddings"):
        embed = out.get("net.model.embed_tokens.weight")
        if embed is not None:
            out[tied] = embed.copy()  # two tensors, as model_to_arrays gives
    missing = [k for k in shapes if k not in out]
    wrong = [k for k in shapes if k in out and tuple(out[k].shape) != shapes[k]]
    if missing or wrong:
        raise ValueError(f"{problem}: tensors missing {missing[:5]}, of another shape {wrong[:5]}")
    return {k: out[k] for k in shapes}
