"""Your own MoE model: run-config ``model = "package.module:factory"``.

The value names a callable, imported on the server and on every client (the module must be
importable on every node: installed in the nodes' environment, or its folder on ``PYTHONPATH``;
``fedmoe-launch`` puts the app folder first on it). The app calls it with keyword arguments, only
those its signature names (all of them if it takes ``**kwargs``):

``factory(num_experts=E, top_k=k, expert_ids=ids, seed=s, data_info=info) -> MoEModel``

* ``num_experts``, ``top_k``: the run config's ``num-experts`` and ``top-k``;
* ``expert_ids``: the experts this instance holds, to pass on to :meth:`MoEModel._hold` (``None``:
  all; a list of global ids, the same in every MoE layer; or one list per MoE layer);
* ``seed``: the initialisation seed (the app also seeds torch with it around the call, so a
  factory that ignores it is still deterministic);
* ``data_info``: the dataset's description, an object with attributes: for images
  ``in_channels``, ``image_size``, ``num_classes``; for text ``vocab_size``, ``context_length``,
  ``groups``, ``tokenizer``.

It returns a :class:`~fedmoe_app.models.interface.MoEModel` (module docstring of
:mod:`.interface`): it calls ``self._hold(num_experts, expert_ids, num_layers)`` in its
constructor, stores each MoE layer's experts stacked by slot in a module named ``experts``,
masks the router logits of experts it does not hold (``self.held`` / ``self.layer_held``) and
returns a :class:`~fedmoe_app.models.interface.MoEOutput` from ``forward(x, y=None)``. The app
sets ``model.spec`` (a :class:`UserSpec`: ``num_experts``, ``top_k``, ``routes_per_example``)
unless the model set its own with the same ``num_experts`` and ``top_k``.

What the run needs beyond the model is derived from it (:mod:`.measured_costs`), unless the
model supplies it as an attribute:

* ``routes_per_example``: routing decisions per example and chosen expert (1 for an image routed
  once, ``context_length x layers`` for a sequence); measured by one forward pass;
* ``flops_per_example``: ``(shared, experts)`` training FLOPs per example, the experts' part for
  the ``top_k`` chosen ones together; measured with :class:`torch.utils.flop_counter.FlopCounterMode`;
* ``example_batch(n) -> (x, y)``: ``n`` example inputs and targets for these measurements; made
  from ``data_info`` for images and text.

Parameters are counted from the built model, activation memory is measured
(:mod:`.memory_probe`). A bad module path, a missing attribute, a factory that raises or returns
something that is not a working ``MoEModel`` stop the run at start with an error naming the key
``model``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ..capacity import ModelCosts
from ..config import MODELS, ConfigError, RunConfig
from .interface import HeldExperts, MoEModel, MoEOutput, parse_held

ALLOWED = (
    "one of "
    + ", ".join(repr(m) for m in MODELS)
    + ", or 'package.module:factory' importable on the server and every client, the factory returning "
    "a fedmoe_app.models.MoEModel (docs/MODELS.md)"
)
#: Examples of the forward pass that checks a built model and measures its routes.
CHECK_EXAMPLES = 2


def model_error(value: str, why: str, allowed: str = ALLOWED) -> ConfigError:
    """Return the error of run-config key ``model`` = ``value``: why it is invalid, what is allowed."""
    return ConfigError(f"run-config key 'model' = {value!r} is invalid: {why}; allowed: {allowed}")


def resolve_factory(value: str) -> Callable[..., Any]:
    """Import the callable ``package.module:factory`` names.

    Raises
    ------
    ConfigError
        Naming the key ``model``: the module is not importable (or fails while imported), has no
        such attribute, or the attribute is not callable.

    """
    module_name, _, attr = value.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and not (module_name + ".").startswith(exc.name + "."):  # one of the module's imports
            raise model_error(
                value, f"importing module {module_name!r} raised ModuleNotFoundError: {exc}"
            ) from exc
        raise model_error(
            value,
            f"module {module_name!r} is not importable ({exc}); install it on every node or put its "
            "folder on PYTHONPATH",
        ) from None
    except Exception as exc:  # the user's module failed while imported: say which and how
        raise model_error(
            value, f"importing module {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module_name
            )
            raise model_error(
                value,
                f"module {module_name!r} has no attribute {attr!r}",
                f"a callable of {module_name!r}: {', '.join(public) or 'it defines none'}",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise model_error(value, f"{attr!r} is a {type(obj).__name__}, not callable")
    return obj


def call_factory(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``factory`` with the keyword arguments of ``kwargs`` its signature names (all with ``**``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature (a builtin): pass everything
        return factory(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return factory(**kwargs)
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return factory(**{k: v for k, v in kwargs.items() if k in names})


def data_fields(info: Any) -> tuple[tuple[str, Any], ...]:
    """Return the fields of a dataset description (a dataclass or an object) as sorted hashable pairs."""
    items = dataclasses.asdict(info) if dataclasses.is_dataclass(info) else dict(vars(info))
    return tuple(sorted((k, _frozen(v)) for k, v in items.items() if not k.startswith("_")))


def _frozen(value: Any) -> Any:
    """Turn lists (as JSON writes tuples) back into tuples, recursively."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class UserSpec:
    """A user's model: its factory, the run's shape, the dataset's description, the measured routes.

    ``model_spec`` makes it with :meth:`from_config`, which builds and checks the model once per
    process (:func:`inspect_factory`); every field is JSON-serializable, so the run folder records
    it (``model_spec.json``) and an export rebuilds it.
    """

    factory: str
    num_experts: int
    top_k: int
    data: tuple[tuple[str, Any], ...]
    num_layers: int
    routes_per_example: int

    @classmethod
    def from_config(cls, cfg: RunConfig, info: Any) -> UserSpec:
        """Resolve ``cfg.model``, build a one-expert model and check it (see :func:`inspect_factory`)."""
        return inspect_factory(cfg.model, cfg.num_experts, cfg.top_k, data_fields(info))

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> UserSpec:
        """Return the spec of ``dataclasses.asdict``'s fields (as JSON gave them back)."""
        return cls(**{k: _frozen(v) for k, v in fields.items()})

    @property
    def data_info(self) -> SimpleNamespace:
        """The dataset's description the factory receives (attributes: :attr:`data`'s names)."""
        return SimpleNamespace(**dict(self.data))

    def build(self, expert_ids: HeldExperts | None = None, seed: int = 0) -> MoEModel:
        """Build the model holding ``expert_ids`` (all if None), initialised from ``seed``; checked."""
        return build_user_model(self, resolve_factory(self.factory), expert_ids, seed)

    def costs(self) -> ModelCosts:
        """Parameters, activations and FLOPs as capacity planning sees them (:mod:`.measured_costs`)."""
        from .measured_costs import measured_costs  # it builds models of this module

        return measured_costs(self)


def build_user_model(
    spec: UserSpec, factory: Callable[..., Any], expert_ids: HeldExperts | None, seed: int
) -> MoEModel:
    """Call ``factory`` under ``seed`` and check what it returned against the contract.

    Raises
    ------
    ConfigError
        Naming the key ``model``, if the factory raises or returns something else than an
        :class:`MoEModel` holding ``expert_ids`` with stacked expert tensors.

    """
    kwargs = {
        "num_experts": spec.num_experts,
        "top_k": spec.top_k,
        "expert_ids": expert_ids,
        "seed": seed,
        "data_info": spec.data_info,
    }
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = call_factory(factory, **kwargs)
    except Exception as exc:
        raise model_error(spec.factory, f"the factory raised {type(exc).__name__}: {exc}") from exc
    check_model(spec, model, expert_ids)
    return model


def check_model(spec: UserSpec, model: Any, expert_ids: HeldExperts | None) -> None:
    """Check a factory's ``model`` offers what the contract needs; set its ``spec`` if it has none.

    Raises
    ------
    ConfigError
        Naming the key ``model`` and what is missing.

    """
    value = spec.factory
    if not isinstance(model, MoEModel):
        raise model_error(
            value, f"the factory returned a {type(model).__name__}, not a fedmoe_app.models.MoEModel"
        )
    if not hasattr(model, "layer_ids"):
        raise model_error(value, "the model did not call self._hold(num_experts, expert_ids, num_layers)")
    if model.held.shape != (spec.num_experts,):
        raise model_error(
            value,
            f"the model holds experts of {model.held.shape[0]}, the run has num-experts {spec.num_experts}",
        )
    want = parse_held(expert_ids, spec.num_experts, len(model.layer_ids))
    if model.layer_ids != want:
        raise model_error(value, f"the model holds experts {model.layer_ids}, asked for {want} (expert_ids)")
    own = getattr(model, "spec", None)
    if own is None:
        model.spec = spec
    elif (getattr(own, "num_experts", None), getattr(own, "top_k", None)) != (spec.num_experts, spec.top_k):
        raise model_error(value, "the model's own spec has other num_experts / top_k than the run")
    names = model.expert_tensor_names()
    if not names:
        raise model_error(
            value, "the model has no expert tensors (stacked [n_held, ...] in a module named 'experts')"
        )
    try:
        layers = model.expert_tensor_layers()
    except ValueError as exc:
        raise model_error(value, str(exc)) from None
    state = model.federated_state()
    for name, layer in layers.items():
        if state[name].shape[0] != len(model.layer_ids[layer]):
            raise model_error(
                value,
                f"its expert tensor {name!r} has {state[name].shape[0]} slots, its MoE layer {layer} "
                f"holds {len(model.layer_ids[layer])} experts",
            )


def example_batch(spec: UserSpec, model: MoEModel, n: int) -> tuple[Tensor, Tensor]:
    """``n`` seeded example inputs and targets: the model's ``example_batch(n)``, else from ``data_info``.

    Raises
    ------
    ConfigError
        If the model has no ``example_batch`` and the dataset is neither images nor text.

    """
    own = getattr(model, "example_batch", None)
    if callable(own):
        return own(n)
    info, gen = dict(spec.data), torch.Generator().manual_seed(n)
    if {"vocab_size", "context_length"} <= set(info):
        tokens = torch.randint(
            0, int(info["vocab_size"]), (n, int(info["context_length"]) + 1), generator=gen
        )
        return tokens[:, :-1], tokens[:, 1:]
    if {"in_channels", "image_size", "num_classes"} <= set(info):
        c, s = int(info["in_channels"]), int(info["image_size"])
        return torch.randn(n, c, s, s, generator=gen), torch.randint(
            0, int(info["num_classes"]), (n,), generator=gen
        )
    raise model_error(
        spec.factory,
        f"the app cannot make example inputs for a dataset described by {sorted(info)}",
        "a model with a method example_batch(n) -> (inputs, targets)",
    )


@functools.lru_cache(maxsize=16)
def inspect_factory(value: str, num_experts: int, top_k: int, data: tuple[tuple[str, Any], ...]) -> UserSpec:
    """Resolve ``value``, build the model holding expert 0 and check one forward pass; return its spec.

    The forward pass (:data:`CHECK_EXAMPLES` examples of :func:`example_batch`) must return an
    :class:`MoEOutput` with ``[L, E]`` feedback; its tokens per example (one expert held: top-1)
    are ``routes_per_example`` unless the model sets that attribute. Cached per process.

    Raises
    ------
    ConfigError
        Naming the key ``model`` (:func:`resolve_factory`, :func:`build_user_model`, or the pass).

    """
    factory = resolve_factory(value)
    draft = UserSpec(value, num_experts, top_k, data, num_layers=0, routes_per_example=0)
    model = build_user_model(draft, factory, [0], seed=0)
    layers = len(model.layer_ids)
    x, y = example_batch(draft, model, CHECK_EXAMPLES)
    try:
        with torch.no_grad():
            out = model(x, y)
    except Exception as exc:
        raise model_error(value, f"the model's forward(x, y) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, MoEOutput):
        raise model_error(value, f"the model's forward returned a {type(out).__name__}, not an MoEOutput")
    if tuple(out.layer_tokens.shape) != (layers, num_experts):
        raise model_error(
            value,
            f"its forward's layer_tokens has shape {tuple(out.layer_tokens.shape)}, not [L, E] = "
            f"[{layers}, {num_experts}]",
        )
    routes = getattr(model, "routes_per_example", None)
    if routes is None:
        measured = float(out.layer_tokens.sum()) / CHECK_EXAMPLES
        if measured <= 0 or measured != int(measured):
            raise model_error(
                value, f"one forward pass routed {measured} tokens per example (holding one expert)"
            )
        routes = int(measured)
    return dataclasses.replace(draft, num_layers=layers, routes_per_example=int(routes))
