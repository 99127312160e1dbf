"""Checkpoint folders: ``config.json``, ``model.safetensors``, ``tokenizer/``, ``trainer_state/``.

Nothing we write is a pickle: weights are safetensors, and so is the optimizer / scheduler / RNG
state (its tensors, with the rest as JSON in the file's metadata). Every write is atomic and
fsynced, so a reader (or a run resumed after a kill) never sees half a checkpoint; what a killed
writer leaves behind is dot-named, ignored, and removed by :func:`remove_leftovers`. Files from
elsewhere are refused with a ``ValueError`` when they are not what they claim to be.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from blip_core.config import BlipConfig, from_dict, to_dict
from blip_core.io import atomic_dir, atomic_path, atomic_write_json, delete_dir
from blip_core.model import BlipModel
from blip_core.vision import resize_pos_embed

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
STATE_DIR = "trainer_state"
OPTIMIZER_FILE = "optimizer.safetensors"
PROGRESS_FILE = "state.json"
_LEGACY_OPTIMIZER_FILE = "optimizer.pt"  # trainer states written before OPTIMIZER_FILE
# Dot-named temporary / replaced / doomed entries of the atomic writers (blip_core.io, below),
# and the temporary file safetensors itself writes beside its target (Rust tempfile: .tmpXXXXXX).
_LEFTOVER = re.compile(r"^\..+\.(tmp|old|del)(-.*)?$|^\.tmp[A-Za-z0-9]{6}$")


def state_dict_for_saving(model: BlipModel) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every parameter and buffer (safetensors wants no aliasing)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_weights(model: BlipModel, path: Path) -> None:
    """Write the model's state as safetensors, atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        save_file(state_dict_for_saving(model), str(tmp), metadata={"format": "pt"})


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ``ValueError`` when it is not a valid one."""
    return read_safetensors(path, device)[0]


def read_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, in one read; ``ValueError`` when it
    is not a valid one."""
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"refusing {path}: not a valid safetensors file ({err})") from None


def save_checkpoint(out: str | Path, model: BlipModel, tokenizer: Any, meta: dict) -> Path:
    """Write the model folder: weights, tokenizer, then ``config.json`` last (marks it complete).

    ``trainer_state/`` beside them is left alone.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # incomplete until rewritten below
    save_weights(model, out / WEIGHTS_FILE)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # else the last call's truncation / padding lands in tokenizer.json,
        backend.no_truncation()  # and a resumed run that encoded nothing saves other bytes
        backend.no_padding()
    with atomic_dir(out / TOKENIZER_DIR) as tmp:
        tokenizer.save_pretrained(str(tmp))
    atomic_write_json(out / CONFIG_FILE, {"model": to_dict(model.cfg), "meta": meta})
    return out


def is_checkpoint(path: str | Path) -> bool:
    """True when ``path`` holds a complete model folder."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_config(path: str | Path) -> tuple[BlipConfig, dict]:
    """The model config and metadata of a checkpoint folder."""
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
        cfg = from_dict(BlipConfig, data["model"])
        _check_types(cfg)
    except (ValueError, TypeError, KeyError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"refusing {path / CONFIG_FILE}: not a model config "
                         f"({type(err).__name__}: {err})") from None
    return cfg, data.get("meta", {})


def _check_types(cfg: Any) -> None:
    """Every field of a (nested) config dataclass holds a value of its declared type."""
    for name, hint in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise TypeError(f"{type(cfg).__name__}.{name} is not of type {hint.__name__}: {value!r:.80}")
            _check_types(value)
        elif hint in (bool, int, float, str):
            allowed = (int, float) if hint is float else hint  # a hand-written 1 is a float too
            if not isinstance(value, allowed) or (hint is not bool and isinstance(value, bool)):
                raise TypeError(f"{type(cfg).__name__}.{name} is not of type {hint.__name__}: "
                                f"{value!r:.80}")


def load_model(
    path: str | Path, image_size: int | None = None, map_location: str = "cpu"
) -> BlipModel:
    """Build the model of a checkpoint folder and load its weights.

    Args:
        image_size: build at another resolution (e.g. 384 to fine-tune a 224 model); the
            position embeddings are resampled.
    """
    cfg, _ = read_config(path)
    if image_size and image_size != cfg.vision.image_size:
        from dataclasses import replace

        cfg = replace(cfg, vision=replace(cfg.vision, image_size=image_size))
    model = BlipModel(cfg)
    load_state(model, load_tensors(Path(path) / WEIGHTS_FILE, device=map_location))
    return model


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> tuple[BlipModel, Any]:
    """A checkpoint's model (on ``device``, eval mode) and its own tokenizer."""
    from blip_core.tokenizer import load_tokenizer

    return load_model(path).to(device).eval(), load_tokenizer(Path(path) / TOKENIZER_DIR)


def check_fits(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Each tensor of ``state`` has the shape and kind (floating point or integer) of ``target``'s.

    Floating-point precisions may differ (an fp16 file loads into an fp32 model); a float weight
    stored as integers, or a counter stored as floats, is refused rather than silently cast.
    """
    for name, tensor in state.items():
        want = target.get(name)
        if want is None:
            continue
        if tensor.shape != want.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(want.shape)}")
        if tensor.dtype != want.dtype and (tensor.is_floating_point() != want.is_floating_point()
                                           or tensor.dtype == torch.bool or tensor.is_complex()):
            raise ValueError(f"{name}: dtype {tensor.dtype} does not fit {want.dtype}")


def load_state(model: BlipModel, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict strictly, resampling ViT position embeddings when sizes differ."""
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state:
            v = model.cfg.vision
            state[key] = resize_pos_embed(state[key], v.image_size, v.patch_size)
    check_fits(model.state_dict(), state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing={missing[:8]}, "
                         f"unexpected={unexpected[:8]}")


# --- resumable trainer state ---------------------------------------------------------------


def save_trainer_state(
    out: str | Path,
    step: int,
    model: BlipModel,
    optim_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``out/trainer_state/step_{step:07d}/`` atomically and prune older ones.

    The folder is built under a dot-name, fsynced and renamed into place; pruned folders are
    renamed to a dot-name before they are deleted. A visible ``step_*`` folder is always whole.

    Args:
        optim_state: optimizer / scheduler state dicts and RNG tensors: tensors, numbers,
            strings, None and (nested) dicts, lists and tuples of them.
        state: JSON-able progress (step, epoch, position in epoch, history, Python/NumPy RNG).
    """
    root = Path(out) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    with atomic_dir(final) as tmp:
        save_file(state_dict_for_saving(model), str(tmp / WEIGHTS_FILE))
        tensors: dict[str, torch.Tensor] = {}
        tree = _flatten(optim_state, tensors)
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"state": json.dumps(tree)})
        (tmp / PROGRESS_FILE).write_text(json.dumps(state))
    for old in sorted(root.glob("step_*"))[:-keep]:
        delete_dir(old)
    return final


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON with its tensors moved to ``tensors`` (dicts keep non-string keys)."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        return {"dict": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a trainer state")


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_flatten`."""
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    (kind, value), = tree.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "tuple":
        return tuple(_unflatten(v, tensors) for v in value)
    return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value}


def _is_complete(folder: Path) -> bool:
    names = {WEIGHTS_FILE, PROGRESS_FILE}
    return all((folder / n).is_file() for n in names) and any(
        (folder / n).is_file() for n in (OPTIMIZER_FILE, _LEGACY_OPTIMIZER_FILE))


def latest_trainer_state(out: str | Path) -> Path | None:
    """The newest complete ``trainer_state/step_*`` folder, or None (dot-named ones are ignored)."""
    done = [p for p in sorted((Path(out) / STATE_DIR).glob("step_*")) if _is_complete(p)]
    return done[-1] if done else None


def clear_trainer_states(out: str | Path) -> int:
    """Delete the ``trainer_state/step_*`` folders of an earlier run (each renamed aside first).

    A fresh run writing into ``out`` calls this: kept, an earlier run's later steps would
    outrank the new run's in the rotation and in :func:`latest_trainer_state`.
    Returns how many were deleted.
    """
    old = sorted((Path(out) / STATE_DIR).glob("step_*"))
    for folder in old:
        delete_dir(folder)
    return len(old)


def remove_leftovers(out: str | Path) -> list[str]:
    """Delete what killed atomic writers left in ``out`` and ``out/trainer_state``.

    Only dot-named temporary (``.tmp``), replaced (``.old-``) and pruned (``.del-``) entries are
    touched, and safetensors' own ``.tmpXXXXXX``; nothing that was ever visible under its own
    name. Returns the names removed.
    """
    removed = []
    for root in (Path(out), Path(out) / STATE_DIR):
        for entry in sorted(root.glob(".*")) if root.is_dir() else []:
            if _LEFTOVER.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
    return removed


def load_trainer_state(path: Path, model: BlipModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model``; return (optimizer state, progress state).

    Raises:
        ValueError: a file of the folder is not what we write (never unpickled beyond what
            ``torch.load(weights_only=True)`` allows for the older ``optimizer.pt``).
    """
    path = Path(path)
    load_state(model, load_tensors(path / WEIGHTS_FILE))
    if (path / OPTIMIZER_FILE).is_file():
        tensors, metadata = read_safetensors(path / OPTIMIZER_FILE)
        try:
            optim_state = _unflatten(json.loads(metadata["state"]), tensors)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"refusing {path / OPTIMIZER_FILE}: not a trainer state "
                             f"({type(err).__name__}: {err})") from None
    else:
        try:
            optim_state = torch.load(path / _LEGACY_OPTIMIZER_FILE, map_location="cpu",
                                     weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as err:
            raise ValueError(f"refusing {path / _LEGACY_OPTIMIZER_FILE}: not a plain tensor file "
                             f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from None
    return optim_state, json.loads((path / PROGRESS_FILE).read_text())
