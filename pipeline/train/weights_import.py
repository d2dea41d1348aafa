"""Import pretrained weights from checkpoints whose Python classes we do not have, and transfer them by name.

The case this exists for is the original YOLOv5 release checkpoint (``yolov5n.pt``, v6.1): a full pickle of
the YOLOv5 repository's classes (``models.yolo.Model``, ``models.common.Conv`` ...). Current Ultralytics
cannot load it, and we do not ship that repository. A pickle can also run arbitrary code, so it is read with
a *restricted* unpickler:

* ``models.*`` and ``utils.*`` globals (the YOLOv5 repository's own classes) resolve to empty
  :class:`torch.nn.Module` stand-ins, created on the fly and never importing anything. Unpickling only
  restores their ``__dict__`` (parameters, buffers, submodules), which is all ``state_dict()`` needs.
* A fixed allow-list resolves normally: torch's own ``weights_only`` allow-list (tensor rebuild functions,
  storages, dtypes, ``torch.Size``, ``torch.device``, ``Parameter``, ``OrderedDict``, ``set`` ...),
  ``torch.nn.modules.*`` classes that are ``nn.Module`` subclasses, a few harmless builtins
  (``slice``, ``frozenset``, ``range``...) and the numpy internals used to pickle arrays and scalars.
* **Everything else is refused** with :class:`UnsafeCheckpointError` before it is called - ``os.system``,
  ``builtins.eval``, ``subprocess.*``, but also dangerous torch callables such as ``torch.hub.load`` or
  ``torch.save`` (the torch namespace is *not* allowed wholesale).

Two independent gates, and ``trust`` only opens the first:

1. the checksum: the file's sha256 must equal the pinned one, else :class:`~pipeline.errors.AssetError`
   is raised *before anything is unpickled*; ``trust=True`` (the CLI's ``--trust``) skips this check;
2. the allow-list above, which always applies, ``trust`` or not. There is no switch to turn it off.

What is in ``yolov5n.pt`` (v6.1 release, sha256 4f180cf2...0a3), checked: a dict with keys ``epoch`` (-1),
``best_fitness`` (None), ``model`` (the FP16 ``models.yolo.Model``), ``ema`` (None: YOLOv5's
``strip_optimizer`` moves the EMA weights into ``model`` and clears ``ema``), ``updates``, ``optimizer``,
``wandb_id`` (all None) and ``date`` ('2022-02-08T18:24:20.515893'). We take ``ema`` when it is present and
not None (an unstripped training checkpoint, where the EMA weights are the ones YOLOv5 itself evaluates and
exports), else ``model``. Its ``state_dict()`` has 349 entries: 342 in layers 0-23 (57 Conv+BN blocks x 6
tensors, 1,757,152 learnable parameters) and 7 in the anchor-based Detect head (``model.24.anchors``,
``model.24.m.{0,1,2}.{weight,bias}``), which has no counterpart in Ultralytics' anchor-free head.

Size: the restricted unpickler and the transfer rules are security-relevant and are meant to be read
together, top to bottom.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import io
import logging
import pickle
import sys
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import AssetError
from pipeline.fileio import sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "UnsafeCheckpointError",
    "TransferReport",
    "load_yolov5_state_dict",
    "restricted_torch_load",
    "transfer_state_dict",
]


class UnsafeCheckpointError(AssetError):
    """A checkpoint's pickle references a global outside the allow-list; nothing of it was executed."""


# --------------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------------

#: Top-level packages of the original YOLOv5 repository, replaced by empty ``nn.Module`` stand-ins.
STANDIN_PACKAGES: frozenset[str] = frozenset({"models", "utils"})

_EXTRA_BUILTINS = ("set", "frozenset", "slice", "range", "complex", "bytearray")

_stand_in_cache: dict[tuple[str, str], type[torch.nn.Module]] = {}


def _stand_in(module: str, name: str) -> type[torch.nn.Module]:
    """An empty ``nn.Module`` subclass standing in for ``module.name`` (one class per global, cached)."""
    key = (module, name)
    cls = _stand_in_cache.get(key)
    if cls is None:

        def __init__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            # REDUCE-style reconstruction would call cls(*args); accept and ignore the arguments.
            torch.nn.Module.__init__(self)

        def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{module}.{name} is a weights-only stand-in; it cannot run forward()")

        cls = type(
            name,
            (torch.nn.Module,),
            {
                "__init__": __init__,
                "forward": forward,
                "__module__": f"detflow_standin.{module}",
                "__qualname__": name,
                "__doc__": f"Weights-only stand-in for {module}.{name} (no code from that module).",
            },
        )
        _stand_in_cache[key] = cls
    return cls


def _numpy_allowed() -> dict[str, Any]:
    """numpy globals that ``ndarray`` / numpy scalar pickles reference (only if numpy is importable)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a core dependency
        return {}
    allowed: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        for fn_name in ("_reconstruct", "scalar"):
            try:
                # numpy._core.multiarray is always importable in numpy 2; numpy.core.* is a shim.
                mod = sys.modules.get(mod_name) or __import__(mod_name, fromlist=[fn_name])
                allowed[f"{mod_name}.{fn_name}"] = getattr(mod, fn_name)
            except (ImportError, AttributeError):
                continue
    # numpy 2 pickles dtypes of arrays as numpy.dtypes.<X>DType classes in some paths.
    dtypes_mod = getattr(np, "dtypes", None)
    if dtypes_mod is not None:
        for attr in dir(dtypes_mod):
            obj = getattr(dtypes_mod, attr)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                allowed[f"numpy.dtypes.{attr}"] = obj
    return allowed


def _allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    allowed: dict[str, Any] = dict(_weights_only_unpickler._get_allowed_globals())
    for b in _EXTRA_BUILTINS:
        allowed[f"builtins.{b}"] = getattr(__import__("builtins"), b)
    allowed["torch._utils._rebuild_parameter"] = torch._utils._rebuild_parameter
    allowed.update(_numpy_allowed())
    return allowed


_ALLOWED: dict[str, Any] | None = None


def _allowed() -> dict[str, Any]:
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _allowed_globals()
    return _ALLOWED


def _is_identifier_path(s: str) -> bool:
    return bool(s) and all(part.isidentifier() for part in s.split("."))


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        # Protocol <3 pickles (torch.save's default is 2) name Python 2 modules such as __builtin__;
        # the default find_class maps them, an override has to do it itself.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]

        if not (_is_identifier_path(module) and name.isidentifier()):
            # Dotted names (protocol 4 qualnames) would allow attribute walks like "Conv2d.__init__...".
            raise UnsafeCheckpointError(f"refused to unpickle global {module!r}.{name!r}: not a plain name")

        if module.split(".", 1)[0] in STANDIN_PACKAGES:
            return _stand_in(module, name)

        qualified = f"{module}.{name}"
        allowed = _allowed()
        if qualified in allowed:
            return allowed[qualified]

        if module.startswith("torch.nn.modules."):
            # Only modules torch has already imported; never import anything on a pickle's request.
            mod = sys.modules.get(module)
            obj = getattr(mod, name, None) if mod is not None else None
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
                return obj

        raise UnsafeCheckpointError(
            f"refused to unpickle global '{qualified}': it is not on the allow-list of this restricted "
            "unpickler (a checkpoint pickle can run code; only torch tensors/modules, the YOLOv5 stand-ins "
            "and plain containers are accepted). The file is not a plain weights checkpoint - do not load it."
        )


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


#: A module-like object for ``torch.load(pickle_module=...)``: torch needs ``Unpickler`` (zip format),
#: ``load`` (legacy format headers) and ``__name__`` (it checks for ``dill``).
restricted_pickle = types.ModuleType("detflow_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


def restricted_torch_load(data: bytes | str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` through :data:`restricted_pickle` (no checksum check here: callers do that)."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    # weights_only must be False when a pickle_module is given; the restriction is ours, not torch's.
    return torch.load(src, map_location=map_location, pickle_module=restricted_pickle, weights_only=False)


# --------------------------------------------------------------------------------------------------
# Loading the YOLOv5 checkpoint
# --------------------------------------------------------------------------------------------------


def _check_sha256(path: Path, expected_sha256: str | None, trust: bool) -> str:
    actual = sha256_file(path)
    expected = expected_sha256.strip().lower() if expected_sha256 else None
    if expected == actual:
        return actual
    if trust:
        log.warning(
            "loading %s without a matching checksum because trust=True (expected sha256 %s, actual %s); "
            "the restricted unpickler still applies",
            path,
            expected,
            actual,
        )
        return actual
    if expected is None:
        raise AssetError(
            f"refusing to load {path}: no expected sha256 is pinned for it (actual sha256 {actual}). "
            "Pin the sha256 in the asset manifest, or pass --trust to load it anyway "
            "(the restricted unpickler still applies)."
        )
    raise AssetError(
        f"refusing to load {path}: sha256 mismatch - expected {expected}, actual {actual}. "
        "The file is not the pinned checkpoint (corrupt, truncated or replaced). Fetch the right file, "
        "or pass --trust to load it anyway (the restricted unpickler still applies)."
    )


def _pick_weights(obj: Any, path: Path) -> tuple[str, Any]:
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("ema", "model"):
            if obj.get(key) is not None:
                return key, obj[key]
        raise AssetError(f"{path}: checkpoint dict has neither a non-empty 'ema' nor 'model' entry")
    return "<root>", obj


def load_yolov5_state_dict(
    path: Path, expected_sha256: str | None, trust: bool = False
) -> dict[str, torch.Tensor]:
    """Read an original-YOLOv5 checkpoint into a plain state dict, safely.

    Refuses with :class:`AssetError` (before unpickling anything) unless the file's sha256 equals
    ``expected_sha256`` or ``trust`` is True. Whatever ``trust`` says, the pickle is read with the
    restricted unpickler, which raises :class:`UnsafeCheckpointError` on any global outside its allow-list.

    Returns the weights of ``ckpt['ema']`` if present and not None, else ``ckpt['model']`` (the release
    file has ``ema=None`` and FP16 weights in ``model``), keyed like ``'model.0.conv.weight'``. Floating
    tensors are cast to float32; integer buffers (``num_batches_tracked``) keep their dtype. All on CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"checkpoint not found: {path}")
    actual = _check_sha256(path, expected_sha256, trust)

    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != actual:  # the file changed between the check and the read
        raise AssetError(f"{path} changed while being read; refusing to load it")

    try:
        obj = restricted_torch_load(data)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # corrupt zip, truncated pickle, TORCH_FORCE_WEIGHTS_ONLY_LOAD set, ...
        raise AssetError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e

    which, weights = _pick_weights(obj, path)
    if isinstance(weights, torch.nn.Module):
        raw = weights.state_dict()
    elif isinstance(weights, Mapping):
        raw = dict(weights)
    else:
        raise AssetError(f"{path}: '{which}' is a {type(weights).__name__}, not a module or state dict")

    out: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach().to("cpu")
        out[str(k)] = v.float() if v.is_floating_point() else v.clone()
    if not out:
        raise AssetError(f"{path}: no tensors found in '{which}'")
    log.info("loaded %d tensors from %s ('%s', sha256 %s)", len(out), path, which, actual)
    return out


# --------------------------------------------------------------------------------------------------
# Transfer by name and shape
# --------------------------------------------------------------------------------------------------


@dataclass
class TransferReport:
    """What :func:`transfer_state_dict` copied.

    ``tensors_*`` count state-dict entries (parameters and persistent buffers such as BatchNorm running
    stats); ``params_*`` count elements of learnable parameters (``named_parameters``) only, the number
    usually quoted as a model's size. Totals are over the *target* model.
    """

    source: str
    sha256: str | None
    tensors_transferred: int
    tensors_total: int
    params_transferred: int
    params_total: int
    new_modules: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


def _module_units(model: torch.nn.Module) -> list[str]:
    """Names of the 'top-level' modules: the root's children, descending through plain containers.

    ``DetectionModel`` -> ``model.0`` ... ``model.24``; torchvision Faster R-CNN -> ``backbone``, ``rpn``,
    ``roi_heads``.
    """
    units: list[str] = []

    def walk(mod: torch.nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS) and len(child) > 0:
                walk(child, full + ".")
            else:
                units.append(full)

    walk(model, "")
    return units


def _unit_of(key: str, units: list[str]) -> str:
    best = ""
    for u in units:
        if (key == u or key.startswith(u + ".")) and len(u) > len(best):
            best = u
    return best or key  # a tensor registered directly on the root is its own unit


def transfer_state_dict(
    model: torch.nn.Module, source: Mapping[str, torch.Tensor], source_name: str, sha256: str | None
) -> TransferReport:
    """Copy every source tensor whose name AND shape match a target state-dict entry into ``model``.

    In place, under ``torch.no_grad()``; each target keeps its dtype and device (the source is cast).
    Works for any ``nn.Module``. Source keys that were not copied are listed in ``skipped`` with
    ``reason`` ``'missing_in_target'`` or ``'shape_mismatch'`` (with ``source_shape`` and
    ``target_shape``); ``new_modules`` lists the target's top-level modules that received nothing.
    """
    target = model.state_dict(keep_vars=True)
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}

    transferred: set[str] = set()
    skipped: list[dict] = []
    with torch.no_grad():
        for key, src in source.items():
            if not isinstance(src, torch.Tensor):
                skipped.append({"key": key, "reason": "not_a_tensor", "type": type(src).__name__})
                continue
            dst = target.get(key)
            if dst is None:
                skipped.append({"key": key, "reason": "missing_in_target", "source_shape": list(src.shape)})
                continue
            if tuple(dst.shape) != tuple(src.shape):
                skipped.append(
                    {
                        "key": key,
                        "reason": "shape_mismatch",
                        "source_shape": list(src.shape),
                        "target_shape": list(dst.shape),
                    }
                )
                continue
            dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
            transferred.add(key)

    units = _module_units(model)
    unit_keys: dict[str, list[str]] = {}
    for key in target:
        unit_keys.setdefault(_unit_of(key, units), []).append(key)
    new_modules = [u for u, keys in unit_keys.items() if not any(k in transferred for k in keys)]

    report = TransferReport(
        source=source_name,
        sha256=sha256,
        tensors_transferred=len(transferred),
        tensors_total=len(target),
        params_transferred=sum(target[k].numel() for k in transferred if k in param_names),
        params_total=sum(target[k].numel() for k in target if k in param_names),
        new_modules=new_modules,
        skipped=skipped,
    )
    log.info(
        "transferred %d/%d tensors (%d/%d parameters) from %s; new modules: %s; skipped %d source keys",
        report.tensors_transferred,
        report.tensors_total,
        report.params_transferred,
        report.params_total,
        source_name,
        ", ".join(new_modules) or "none",
        len(skipped),
    )
    return report
