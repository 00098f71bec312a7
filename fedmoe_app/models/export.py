"""The global model as a standard folder: a transformers ``save_pretrained`` folder, or safetensors.

The server keeps the global model as named arrays (:mod:`fedmoe_app.tensors`: shared tensors
under their state names, expert ``e`` of a stacked tensor as ``experts.<e>.<suffix>``).
Exporting restacks them into the model that holds every expert, experts in global order
``0..E-1`` (:func:`stacked_state`), and writes that model in its family's standard form:

* ``hf``: :func:`save_hf_model` builds the transformers model of the spec's config on the meta
  device (no weights allocated), and ``save_pretrained(folder, state_dict=...)`` writes the
  restacked tensors in the dtype the config names (``dtype`` / ``torch_dtype``; float32 if
  none), in transformers' published layout, so ``AutoModelForCausalLM.from_pretrained(folder)``
  loads it;
* ``cnn-moe`` / ``transformer-moe`` / a user's ``package.module:factory``: :func:`save_native_model`
  writes ``model.safetensors`` (the state dict of the model class holding every expert) and
  :data:`MODEL_FILE`.

Every export also holds :data:`MODEL_FILE` (``fedmoe_model.json``: the family and its spec's
fields), so :func:`load_exported` rebuilds the app's :class:`MoEModel` holding every expert
from either form (an ``hf`` folder is read back as ``hf-weights``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import is_model_factory
from ..files import atomic_write
from ..tensors import expert_key
from .arrays import to_torch
from .interface import MoEModel, expert_suffix
from .registry import MODEL_FAMILIES, Spec
from .user_model import UserSpec

#: The app's description of an exported model: ``{"model": family, "spec": {field: value}}``.
MODEL_FILE = "fedmoe_model.json"
#: The weights of a ``cnn-moe`` / ``transformer-moe`` export.
WEIGHTS_FILE = "model.safetensors"
#: The PEFT adapter folder inside an ``hf`` export of a ``peft = "lora"`` run.
ADAPTER_DIR = "adapter"


def family_of(spec: Spec) -> str:
    """Run-config ``model`` of ``spec`` (the key of its class in ``MODEL_FAMILIES``, or its factory)."""
    if isinstance(spec, UserSpec):
        return spec.factory
    for name, cls in MODEL_FAMILIES.items():
        if type(spec) is cls:
            return name
    raise ValueError(f"{type(spec).__name__} is not a model family's spec; known: {sorted(MODEL_FAMILIES)}")


def spec_document(spec: Spec) -> dict[str, Any]:
    """``{"model": family, "spec": fields}`` of ``spec``, as JSON-serializable values."""
    return {"model": family_of(spec), "spec": dataclasses.asdict(spec)}


def spec_from_document(doc: Mapping[str, Any]) -> Spec:
    """Return the spec :func:`spec_document` describes.

    Raises
    ------
    ValueError
        If the family is unknown or the fields are not its spec's.

    """
    family = doc.get("model")
    user = isinstance(family, str) and is_model_factory(family)  # a user's model: its factory's spec
    if family not in MODEL_FAMILIES and not user:
        known = f"{sorted(MODEL_FAMILIES)} or package.module:factory"
        raise ValueError(f"model {family!r} is not a model family; allowed: {known}")
    cls = UserSpec if user else MODEL_FAMILIES[family]
    fields = dict(doc.get("spec") or {})
    names = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != names:
        raise ValueError(f"spec of model {family!r} has fields {sorted(fields)}; expected {sorted(names)}")
    if user:
        return UserSpec.from_fields(fields)
    if isinstance(fields.get("lora"), Mapping):  # an hf spec of a LoRA run: its section, as JSON wrote it
        from ..config.sections import LoraSection

        lora = dict(fields["lora"])
        fields["lora"] = LoraSection(**{**lora, "target_modules": tuple(lora["target_modules"])})
    return cls(**fields)


def stacked_state(
    arrays: Mapping[str, np.ndarray], state_names: Iterable[str], num_experts: int, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Restack global-named arrays into the state dict of the model holding every expert.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray]
        The global model: shared tensors under their state names, experts as
        ``experts.<e>.<suffix>``.
    state_names : Iterable[str]
        The state-dict names of the model to fill; a name with an ``experts`` component is a
        tensor stacked by expert (:func:`~fedmoe_app.models.interface.expert_suffix`).
    num_experts : int
        ``E``: slot ``e`` of every stacked tensor is global expert ``e``.
    prefix : str
        Prepended to every state name to find its global name (``"net."`` for ``hf``: the
        transformers model is ``HFMoE.net``).

    Raises
    ------
    KeyError
        If a tensor is missing or the arrays hold tensors the model does not have.

    """
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    missing: list[str] = []
    for name in state_names:
        full = prefix + name
        if "experts" in full.split("."):
            keys = [expert_key(e, expert_suffix(full)) for e in range(num_experts)]
            if any(k not in arrays for k in keys):
                missing += [k for k in keys if k not in arrays]
                continue
            out[name] = np.stack([np.asarray(arrays[k]) for k in keys])
        elif full in arrays:
            keys = [full]
            out[name] = np.asarray(arrays[full])
        else:
            missing.append(full)
            continue
        used.update(keys)
    extra = sorted(set(arrays) - used)
    if missing or extra:
        raise KeyError(f"arrays do not match the model: missing={missing[:5]}, unexpected={extra[:5]}")
    return out


def _tensors(state: Mapping[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: to_torch(v).to(dtype) for k, v in state.items()}


def hf_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """Return the dtype a transformers config names (``dtype``, else ``torch_dtype``); float32 if none.

    Raises
    ------
    ValueError
        If the name is not a floating torch dtype.

    """
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    name = str(name).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"the model config's dtype {name!r} is not a floating torch dtype")
    return dtype


def _meta_net(spec: Any) -> tuple[Any, torch.dtype]:
    """Return ``spec.config``'s transformers model on the meta device and its dtype (:func:`hf_dtype`).

    Its architecture, config and weight-name conversions are what ``save_pretrained`` needs; it
    holds no weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = spec.config
    dtype = hf_dtype(config)
    hf_cfg = AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype), dtype


def _save_pretrained(spec: Any, net: Any, state: Mapping[str, torch.Tensor], folder: Path) -> list[Path]:
    """``save_pretrained`` the meta model ``net`` of ``spec`` with ``state`` (its own names, its dtype).

    :data:`MODEL_FILE` records the spec (without its weights path). Returns the files written.
    """
    folder = Path(folder)
    before = set(folder.iterdir()) if folder.is_dir() else set()
    net.save_pretrained(folder, state_dict=dict(state), safe_serialization=True)
    doc = spec_document(dataclasses.replace(spec, weights=""))
    atomic_write(folder / MODEL_FILE, json.dumps(doc, indent=2))
    return sorted(set(folder.iterdir()) - before)


def save_hf_model(spec: Any, arrays: Mapping[str, np.ndarray], folder: Path) -> list[Path]:
    """Write the ``hf`` global model as a ``save_pretrained`` folder; return the files written.

    The arrays, restacked (:func:`stacked_state`) into the state dict of the transformers model
    and cast to the config's dtype, are written in transformers' published layout, so
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads them. A ``peft = "lora"`` spec's arrays
    are adapters only: :func:`save_hf_lora`.
    """
    if getattr(spec, "lora", None) is not None:
        return save_hf_lora(spec, arrays, folder)
    net, dtype = _meta_net(spec)
    state = _tensors(stacked_state(arrays, net.state_dict(), spec.num_experts, prefix="net."), dtype)
    return _save_pretrained(spec, net, state, folder)


def save_hf_lora(spec: Any, arrays: Mapping[str, np.ndarray], folder: Path) -> list[Path]:
    """Write a LoRA run's global model: the base as ``save_pretrained`` plus the adapters in ``adapter/``.

    The base is what every node built and kept frozen (``hf-weights`` / ``hf-model``, or the
    preset's seeded init); the model holding every expert is built with it, the global adapters
    ``arrays`` are loaded, and :func:`~fedmoe_app.models.hf_lora.write_adapter` writes the PEFT
    folder :data:`ADAPTER_DIR`, which
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), folder / "adapter")``
    loads onto the base.
    """
    from .arrays import load_arrays
    from .hf import build_hf
    from .hf_lora import base_state_dict, write_adapter

    model = build_hf(spec)
    load_arrays(model, arrays)
    net, dtype = _meta_net(spec)
    base = {k: v.detach().to(dtype).contiguous() for k, v in base_state_dict(model).items()}
    files = _save_pretrained(spec, net, base, folder)
    adapter = write_adapter(Path(folder) / ADAPTER_DIR, model)
    return files + sorted(adapter.iterdir())


def save_native_model(spec: Spec, arrays: Mapping[str, np.ndarray], folder: Path) -> list[Path]:
    """Write a ``cnn-moe`` / ``transformer-moe`` global model: :data:`WEIGHTS_FILE` and :data:`MODEL_FILE`.

    The weights are the state dict of ``spec``'s model holding every expert, under the names
    its class gives them (float32); the model is built once to take its names and to check
    that the tensors load into it.
    """
    from safetensors.torch import save_file

    model = spec.build(None, seed=0)
    state = _tensors(stacked_state(arrays, model.state_dict(), spec.num_experts), torch.float32)
    model.load_state_dict(state)  # strict: the names and shapes are the model's
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "model": family_of(spec)})
    atomic_write(folder / MODEL_FILE, json.dumps(spec_document(spec), indent=2))
    return [folder / WEIGHTS_FILE, folder / MODEL_FILE]


def load_exported(folder: str | Path) -> MoEModel:
    """Load an exported global model as the app's model holding every expert.

    Parameters
    ----------
    folder : str | Path
        A folder written by :func:`save_native_model` (``model.safetensors`` +
        ``fedmoe_model.json``) or :func:`save_hf_model` (a ``save_pretrained`` folder, read as
        ``hf-weights``).

    Returns
    -------
    MoEModel
        The model of the recorded spec, every expert held, the exported weights loaded, in
        evaluation mode.

    Raises
    ------
    FileNotFoundError
        If the folder has no ``fedmoe_model.json``.

    """
    folder = Path(folder)
    doc_path = folder / MODEL_FILE
    if not doc_path.is_file():
        raise FileNotFoundError(f"{folder} is not an exported fedmoe model: {MODEL_FILE} is missing")
    spec = spec_from_document(json.loads(doc_path.read_text(encoding="utf-8")))
    if family_of(spec) == "hf":
        model = dataclasses.replace(spec, weights=str(folder)).build(None, seed=0)
    else:
        from safetensors.torch import load_file

        model = spec.build(None, seed=0)
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval()
