"""The server's initial model from a file (``init-weights``): the global arrays as safetensors.

The file holds the global model under the app's own array names (:mod:`fedmoe_app.tensors`:
shared tensors under their state names, expert ``e`` of a stacked tensor as
``experts.<e>.<suffix>``), what the server would otherwise build from the run's seed.
``fedmoe-pretrain`` writes one (:func:`write_init_weights`); a run naming it starts from it
(:func:`read_init_weights`: checked at start-up against the model's names and shapes, every
error naming the run-config key). ``init-weights`` may also name a finished run's ``export``
folder (``model.safetensors`` + ``fedmoe_model.json``, :func:`fedmoe_app.models.load_exported`),
so a run can start from another run's global model. A run resumed from its checkpoint starts
from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..files import atomic_write
from ..tensors import Arrays

#: ``format`` entry of the file's metadata (safetensors' ``__metadata__``).
INIT_WEIGHTS_FORMAT = "fedmoe-arrays"
_KEY = "run-config key 'init-weights'"


def write_init_weights(
    path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> Path:
    """Write the global ``arrays`` as a safetensors file a run loads with ``init-weights``; return it.

    ``metadata`` (strings) goes into the file's header beside ``format`` (:data:`INIT_WEIGHTS_FORMAT`).
    The file is written atomically.
    """
    from safetensors.numpy import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    atomic_write(path, save(tensors, metadata={**metadata, "format": INIT_WEIGHTS_FORMAT}))
    return path


def _problem(path: str, what: str) -> ConfigError:
    return ConfigError(
        f"{_KEY} = {path!r} is invalid: {what}; allowed: a safetensors file of this model's global "
        "arrays (fedmoe-pretrain --out) or a run's export folder, with the run's model keys"
    )


def _read(file: Path, shown: str) -> Mapping[str, np.ndarray]:
    """Return the arrays of a safetensors file, or of an export folder under the app's names."""
    if file.is_dir():
        from ..models import load_exported, model_to_arrays
        from ..models.export import MODEL_FILE

        if not (file / MODEL_FILE).is_file():
            raise _problem(shown, f"a folder without {MODEL_FILE} (not a run's export folder)")
        try:
            return model_to_arrays(load_exported(file))
        except Exception as exc:  # noqa: BLE001 - any damage to the folder is reported the same way
            raise _problem(shown, f"the export folder cannot be loaded ({exc})") from None
    if not file.is_file():
        raise _problem(shown, "no such file")
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise _problem(shown, "reading it needs the safetensors package (pip install safetensors)") from None
    try:
        return load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own errors for a damaged file
        raise _problem(shown, f"it cannot be read as safetensors ({exc})") from None


def read_init_weights(path: str | Path, model: Mapping[str, np.ndarray]) -> Arrays:
    """Return the arrays of the safetensors file ``path``, checked against the ``model``'s arrays.

    Parameters
    ----------
    path : str | Path
        The file, or a run's export folder (``~`` expanded).
    model : Mapping[str, np.ndarray]
        The global model the run would build (names, shapes and dtypes in the model's order).

    Returns
    -------
    Arrays
        The file's tensors in ``model``'s order, each in the model's dtype.

    Raises
    ------
    ConfigError
        Naming ``init-weights`` and the file if it is missing or unreadable, and the first
        tensor the model has and the file lacks, the first the file holds and the model does
        not, the first whose shape differs (both shapes) or the first holding NaN or inf.

    """
    shown = str(path)
    loaded = _read(Path(path).expanduser(), shown)
    missing = [k for k in model if k not in loaded]
    if missing:
        first = missing[0]
        raise _problem(
            shown,
            f"it lacks tensor {first!r} of shape {tuple(model[first].shape)} "
            f"({len(missing)} of the model's {len(model)} tensors missing)",
        )
    extra = [k for k in sorted(loaded) if k not in model]
    if extra:
        what = f"it holds tensor {extra[0]!r}, which the model does not have ({len(extra)} such)"
        raise _problem(shown, what)
    for name, want in model.items():
        got = loaded[name]
        if tuple(got.shape) != tuple(want.shape):
            raise _problem(
                shown, f"tensor {name!r} has shape {tuple(got.shape)}, the model's is {tuple(want.shape)}"
            )
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            raise _problem(shown, f"tensor {name!r} holds NaN or inf")
    return {name: np.ascontiguousarray(loaded[name], dtype=want.dtype) for name, want in model.items()}
