"""Typed configurations and named presets for the BLIP model and its training.

Presets are data: ``tiny`` (2-core CPU, seconds per step, the embedded default), ``base``
(ViT-B/16 + BERT-base, as in the paper) and ``large`` (ViT-L/16 + BERT-base).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

# BERT uncased WordPiece ids (fixed by the vocabulary) and the two tokens BLIP adds.
PAD_TOKEN_ID = 0
CLS_TOKEN_ID = 101
SEP_TOKEN_ID = 102
DEC_TOKEN_ID = 30522  # [DEC], the decoder's bos
ENC_TOKEN_ID = 30523  # [ENC], replaces [CLS] in the image-grounded text encoder
VOCAB_SIZE = 30524


@dataclass(frozen=True)
class VisionConfig:
    """ViT image encoder (built by timm)."""

    image_size: int = 224  # input resolution (pre-training); fine-tunes may raise it
    patch_size: int = 16  # square patch side in pixels
    width: int = 768  # token embedding dimension
    depth: int = 12  # number of transformer blocks
    heads: int = 12  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden size / width
    drop_path: float = 0.0  # stochastic depth rate
    grad_checkpointing: bool = False  # recompute activations in backward to save memory


@dataclass(frozen=True)
class TextConfig:
    """MED: one BERT-shaped network used as text encoder, grounded encoder and decoder."""

    vocab_size: int = VOCAB_SIZE  # BERT uncased (30522) + [DEC] + [ENC]
    hidden_size: int = 768  # token embedding dimension
    num_layers: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads
    intermediate_size: int = 3072  # feed-forward hidden size
    max_position: int = 512  # learned absolute positions
    dropout: float = 0.1  # hidden and attention dropout
    layer_norm_eps: float = 1e-12  # as BERT


@dataclass(frozen=True)
class BlipConfig:
    """The whole BLIP model: image encoder, MED, heads and the ITC/ITM/LM settings."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection dimension
    queue_size: int = 57600  # ITC momentum feature queue length
    momentum: float = 0.995  # EMA coefficient of the momentum encoders
    temp: float = 0.07  # initial ITC temperature (learnable, clamped to [0.001, 0.5])
    alpha: float = 0.4  # weight of the momentum model's soft targets in ITC
    label_smoothing: float = 0.1  # LM cross-entropy label smoothing
    prompt: str = "a picture of "  # captioning prompt; its tokens are not scored
    max_text_len: int = 35  # tokens per caption, [CLS]/[SEP] included


def _tiny() -> BlipConfig:
    return BlipConfig(
        vision=VisionConfig(image_size=64, patch_size=16, width=128, depth=4, heads=4),
        text=TextConfig(
            hidden_size=128, num_layers=3, num_heads=4, intermediate_size=512,
            max_position=64, dropout=0.0,
        ),
        embed_dim=64,
        queue_size=128,  # a longer queue of stale momentum features stalls short from-scratch runs
        max_text_len=32,
    )


def _base() -> BlipConfig:
    return BlipConfig()


def _large() -> BlipConfig:
    return BlipConfig(vision=VisionConfig(width=1024, depth=24, heads=16, drop_path=0.1,
                                          grad_checkpointing=True))


PRESETS: dict[str, typing.Callable[[], BlipConfig]] = {"tiny": _tiny, "base": _base, "large": _large}


def list_presets() -> list[str]:
    """Names of the model presets."""
    return sorted(PRESETS)


def model_preset(name: str) -> BlipConfig:
    """The model configuration of a named preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {list_presets()}") from None


@dataclass(frozen=True)
class DecodingConfig:
    """How captions are decoded; the defaults of every captioning entry point are BLIP's.

    BLIP calls transformers 4.15's ``generate``; ``lengths="new_tokens"`` and
    ``beam_norm="transformers"`` give what transformers 5 does with the same numbers.
    """

    method: Literal["nucleus", "beam", "greedy"] = "nucleus"  # paper: nucleus is more diverse, better
    top_p: float = 0.9  # nucleus sampling mass
    top_k: int | None = 50  # sampling keeps the k most likely tokens first (transformers' default)
    num_beams: int = 3  # beam search width
    max_length: int = 20  # most tokens, [SEP] included; with lengths="blip" the prompt's count too
    min_length: int = 5  # fewest tokens before [SEP]; with lengths="blip" the prompt's count too
    # blip: max_length / min_length count the prompt ([DEC] a picture of: 4 tokens), as BLIP's
    # generate(max_length=20, min_length=5); new_tokens: they count generated tokens only
    lengths: Literal["blip", "new_tokens"] = "blip"
    # blip: a beam hypothesis scores sum(log p) / (prompt + tokens before [SEP]); transformers:
    # / (generated tokens, [SEP] included), as transformers 5
    beam_norm: Literal["blip", "transformers"] = "blip"
    repetition_penalty: float | None = None  # None: 1.1 for nucleus, 1.0 for beam / greedy (as BLIP)


DECODING = DecodingConfig()
"""The default decoding."""


Task = Literal["pretrain", "captioner", "filter"]

# Which losses each task trains (paper: captioner = LM, filter = ITC + ITM).
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "pretrain": ("itc", "itm", "lm"),
    "captioner": ("lm",),
    "filter": ("itc", "itm"),
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run: pre-training, or a captioner / filter fine-tune.

    The field defaults are the library's (the paper's ViT-B learning rate); the lineage's stages,
    and ``blip-core pretrain / finetune`` without options, train with the recipe's
    (``blip_core.recipe.stage_config``).
    """

    task: Task = "pretrain"  # which losses to train, see TASK_LOSSES
    preset: str = "tiny"  # model preset when not initialised from a checkpoint
    data: tuple[str, ...] = ()  # shard folders and/or "annotations.json:split" sources
    out: str = "runs/pretrain"  # checkpoint folder written by the run
    init_from: str | None = None  # checkpoint to start from (fine-tunes)
    image_size: int | None = None  # override the preset's resolution (e.g. 384 to fine-tune)
    epochs: int = 1  # passes over the data, unless max_steps is set
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 32  # samples per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr: float = 1e-6  # floor of the cosine schedule
    weight_decay: float = 0.05  # AdamW weight decay (not on biases, norms, temperature)
    warmup_steps: int = 50  # linear warm-up from 0 to lr
    alpha_rampup_steps: int | None = None  # ITC alpha ramp; default: the first epoch
    # fp32, bf16-lm (the LM's vocabulary projection in bf16), bf16 (autocast everywhere) or auto:
    # the fastest the hardware runs natively (blip_core.device.resolve_precision)
    precision: Literal["auto", "fp32", "bf16-lm", "bf16"] = "auto"
    device: str = "auto"  # cpu, cuda, or auto: cuda when available (a torchrun rank uses its local GPU)
    save_every: int = 200  # optimizer steps between checkpoints (and one at the end)
    log_every: int = 10  # optimizer steps between log lines
    seed: int = 0  # seeds data order, init and sampling
    num_workers: int = 0  # DataLoader workers
    resume: bool = False  # continue from out/trainer_state when present
    train_augment: bool = True  # mild scale jitter on training images
    progress: bool = True  # tqdm progress bar on rank 0

    @property
    def losses(self) -> tuple[str, ...]:
        return TASK_LOSSES[self.task]


# --- (de)serialisation --------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain data (JSON / YAML friendly)."""
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d))  # tuples -> lists


def from_dict(cls: type, data: dict[str, Any], base: Any = None) -> Any:
    """Build config dataclass ``cls`` from nested plain data, rejecting unknown keys.

    A nested mapping only changes the keys it names: the rest keep the default of the field that
    holds it (``pretrain: {max_steps: 100}`` keeps the recipe's ``pretrain.lr``, not ``Stage``'s).
    ``base``: an instance whose values stand in for the class defaults.
    """
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(by_name)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, _default(by_name[name]) if base is None else getattr(base, name))
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs) if base is None else replace(base, **kwargs)


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (None when it has none)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def load_yaml(cls: type, path: str | Path, base: Any = None) -> Any:
    """Load a config dataclass from a YAML (or JSON) file; ``base`` stands in for the defaults."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return from_dict(cls, data, base)


def parse_bool(raw: str) -> bool:
    """``true/yes/on/1`` or ``false/no/off/0`` (any case) as a bool; ValueError otherwise."""
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _parse_value(raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if raw.lower() in {"none", "null"} and type(None) in typing.get_args(hint):
        return None
    if origin is tuple:
        return tuple(s for s in raw.split(",") if s)
    target = args[0] if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
        and args else hint
    if target is bool:
        return parse_bool(raw)
    if target in (int, float, str):
        return target(raw)
    return yaml.safe_load(raw)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``key=value`` overrides (dotted keys reach nested configs)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        cfg = _set_path(cfg, key.split("."), raw, item)
    return cfg


def _set_path(cfg: Any, path: list[str], raw: str, item: str) -> Any:
    hints = typing.get_type_hints(type(cfg))
    if path[0] not in hints:
        raise ValueError(f"override {item!r}: {type(cfg).__name__} has no field {path[0]!r}")
    if len(path) > 1:
        return replace(cfg, **{path[0]: _set_path(getattr(cfg, path[0]), path[1:], raw, item)})
    return replace(cfg, **{path[0]: _parse_value(raw, hints[path[0]])})
