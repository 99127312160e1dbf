"""Checkpoint folders: ``config.json``, ``model.safetensors``, ``tokenizer/``, ``trainer_state/``.

Weights are always safetensors. The optimizer state is a ``torch.save`` of tensors and numbers
that we wrote ourselves and still load with ``weights_only=True``. Every write is atomic, so a
reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blip_core.config import BlipConfig, from_dict, to_dict
from blip_core.io import atomic_dir, atomic_write_json
from blip_core.model import BlipModel
from blip_core.vision import resize_pos_embed

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
STATE_DIR = "trainer_state"


def state_dict_for_saving(model: BlipModel) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every parameter and buffer (safetensors wants no aliasing)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_weights(model: BlipModel, path: Path) -> None:
    """Write the model's state as safetensors, atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state_dict_for_saving(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def save_checkpoint(out: str | Path, model: BlipModel, tokenizer: Any, meta: dict) -> Path:
    """Write the model folder: weights, tokenizer, then ``config.json`` last (marks it complete).

    ``trainer_state/`` beside them is left alone.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # incomplete until rewritten below
    save_weights(model, out / WEIGHTS_FILE)
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
    data = json.loads((path / CONFIG_FILE).read_text())
    return from_dict(BlipConfig, data["model"]), data.get("meta", {})


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
    state = load_file(str(Path(path) / WEIGHTS_FILE), device=map_location)
    load_state(model, state)
    return model


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> tuple[BlipModel, Any]:
    """A checkpoint's model (on ``device``, eval mode) and its own tokenizer."""
    from blip_core.tokenizer import load_tokenizer

    return load_model(path).to(device).eval(), load_tokenizer(Path(path) / TOKENIZER_DIR)


def load_state(model: BlipModel, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict strictly, resampling ViT position embeddings when sizes differ."""
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        if key in state:
            v = model.cfg.vision
            state[key] = resize_pos_embed(state[key], v.image_size, v.patch_size)
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

    Args:
        optim_state: optimizer / scheduler state dicts and RNG tensors (``weights_only`` safe).
        state: JSON-able progress (step, epoch, position in epoch, history, Python/NumPy RNG).
    """
    root = Path(out) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    with atomic_dir(final) as tmp:
        save_file(state_dict_for_saving(model), str(tmp / WEIGHTS_FILE))
        torch.save(optim_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state))
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_trainer_state(out: str | Path) -> Path | None:
    """The newest complete ``trainer_state/step_*`` folder, or None."""
    root = Path(out) / STATE_DIR
    done = [p for p in sorted(root.glob("step_*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_trainer_state(path: Path, model: BlipModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model``; return (optimizer state, progress state)."""
    load_state(model, load_file(str(path / WEIGHTS_FILE)))
    optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    return optim_state, json.loads((path / "state.json").read_text())
