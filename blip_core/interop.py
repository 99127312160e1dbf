"""Interoperability: official BLIP checkpoints in, Hugging Face ``transformers`` folders out.

Names are translated by tables of ``(ours, theirs)`` prefixes, where ``{i}`` stands for a layer
index; a row matches a parameter name from its start, and the rest of the name (``weight``,
``bias``) is carried over. A name may match several rows: our shared MED weights become both the
official ``text_encoder.*`` and ``text_decoder.bert.*`` copies, and on import every copy must be
equal, which is how BLIP's encoder/decoder weight tying is checked.

Three layouts:

* ours: :class:`~blip_core.model.BlipModel` (timm ViT + :class:`~blip_core.med.MedModel`);
* official BLIP (``model_base*.pth``): timm-named ``visual_encoder``, BERT-named
  ``text_encoder`` (with ``crossattention``), ``text_decoder.bert`` / ``text_decoder.cls``;
* Hugging Face: ``BlipForConditionalGeneration`` (captioner: ``vision_model`` +
  ``text_decoder``) and ``BlipForImageTextRetrieval`` (retrieval / filter: ``vision_model`` +
  ``text_encoder`` + projections + ITM head).

Checkpoint files are read with ``torch.load(weights_only=True)`` only: nothing but tensors and
plain containers is ever unpickled.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from blip_core.checkpoint import check_fits, load_tensors
from blip_core.config import (
    DEC_TOKEN_ID,
    PAD_TOKEN_ID,
    SEP_TOKEN_ID,
    BlipConfig,
    TextConfig,
    VisionConfig,
)
from blip_core.io import atomic_dir, sha256_file
from blip_core.model import EMPTY_SLOT, MOMENTUM_PAIRS, BlipModel

HfTask = Literal["captioner", "retrieval"]
Table = tuple[tuple[str, str], ...]

VIT_LAYER_NORM_EPS = 1e-6  # timm's ViT norms; HF's BlipVisionConfig defaults to 1e-5

# --- name tables (ours -> theirs) ----------------------------------------------------------

# timm ViT (also the official ``visual_encoder``) -> HF ``BlipVisionModel``.
VIT_TO_HF: Table = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.attn.qkv.", "encoder.layers.{i}.self_attn.qkv."),
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.self_attn.projection."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.mlp.fc1.", "encoder.layers.{i}.mlp.fc1."),
    ("blocks.{i}.mlp.fc2.", "encoder.layers.{i}.mlp.fc2."),
    ("norm.", "post_layernorm."),
)

# Our LM head -> BERT's prediction head (official ``text_decoder.cls``, HF ``text_decoder.cls``).
LM_HEAD_TO_BERT: Table = (
    ("lm_head.dense.", "cls.predictions.transform.dense."),
    ("lm_head.norm.", "cls.predictions.transform.LayerNorm."),
    ("lm_head.bias", "cls.predictions.bias"),
)


def med_to_bert(self_attention: Literal["self_attn", "self_attn_causal"]) -> Table:
    """Our MED -> a BERT with cross-attention, reading ``self_attention`` as BERT's ``attention``.

    The encoders (official ``text_encoder``, HF retrieval) use ``self_attn``; the decoders
    (official ``text_decoder.bert``, HF captioner) use ``self_attn_causal``.
    """
    rows = [
        ("embeddings.word_embeddings.", "embeddings.word_embeddings."),
        ("embeddings.position_embeddings.", "embeddings.position_embeddings."),
        ("embeddings.norm.", "embeddings.LayerNorm."),
    ]
    for ours, theirs in ((self_attention, "attention"), ("cross_attn", "crossattention")):
        rows += [(f"layers.{{i}}.{ours}.{p}.", f"encoder.layer.{{i}}.{theirs}.self.{p}.")
                 for p in ("query", "key", "value")]
        rows += [
            (f"layers.{{i}}.{ours}.dense.", f"encoder.layer.{{i}}.{theirs}.output.dense."),
            (f"layers.{{i}}.{ours}.norm.", f"encoder.layer.{{i}}.{theirs}.output.LayerNorm."),
        ]
    rows += [
        ("layers.{i}.mlp.fc1.", "encoder.layer.{i}.intermediate.dense."),
        ("layers.{i}.mlp.fc2.", "encoder.layer.{i}.output.dense."),
        ("layers.{i}.mlp.norm.", "encoder.layer.{i}.output.LayerNorm."),
    ]
    return tuple(rows)


def prefixed(table: Table, ours: str, theirs: str) -> Table:
    """``table`` with a module prefix added on each side."""
    return tuple((ours + a, theirs + b) for a, b in table)


def _same(*names: str) -> Table:
    return tuple((n, n) for n in names)


def hf_table(task: HfTask) -> Table:
    """Ours -> the HF ``BlipForConditionalGeneration`` (captioner) / ``...ImageTextRetrieval``."""
    vision = prefixed(VIT_TO_HF, "visual_encoder.", "vision_model.")
    if task == "captioner":
        return (vision + prefixed(med_to_bert("self_attn_causal"), "text_encoder.", "text_decoder.bert.")
                + prefixed(LM_HEAD_TO_BERT, "", "text_decoder."))
    if task == "retrieval":
        return (vision + prefixed(med_to_bert("self_attn"), "text_encoder.", "text_encoder.")
                + _same("vision_proj.", "text_proj.", "itm_head."))
    raise ValueError(f"unknown task {task!r}; choose captioner or retrieval")


# Ours -> official BLIP. Shared MED weights appear under both text_encoder and text_decoder.bert;
# the tied output projection and its bias appear once more under cls.predictions.decoder.
OFFICIAL_TABLE: Table = (
    _same("visual_encoder.", "visual_encoder_m.", "vision_proj.", "vision_proj_m.", "text_proj.",
          "text_proj_m.", "itm_head.", "temp", "image_queue", "text_queue", "idx_queue",
          "queue_ptr")
    + prefixed(med_to_bert("self_attn"), "text_encoder.", "text_encoder.")
    + prefixed(med_to_bert("self_attn"), "text_encoder_m.", "text_encoder_m.")
    + prefixed(med_to_bert("self_attn_causal"), "text_encoder.", "text_decoder.bert.")
    + prefixed(LM_HEAD_TO_BERT, "", "text_decoder.")
    + (("text_encoder.embeddings.word_embeddings.weight", "text_decoder.cls.predictions.decoder.weight"),
       ("lm_head.bias", "text_decoder.cls.predictions.decoder.bias"))
)

# Official keys with no counterpart of ours: buffers, BERT's unused pooler, a ViT classifier.
_OFFICIAL_IGNORED = re.compile(
    r"^(text_encoder(_m)?|text_decoder\.bert)\.(embeddings\.position_ids|pooler\.)"
    r"|^visual_encoder(_m)?\.head\."
)
_OFFICIAL_ALIASES = {"ptr_queue": "queue_ptr"}  # blip_retrieval.py's name for the pointer


def _compile(table: Table) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for src, dst in table:
        pattern = "^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + ("" if src.endswith(".") else "$")
        rules.append((re.compile(pattern), dst.replace("{i}", r"\1")))
    return rules


def rename(
    state: Mapping[str, torch.Tensor], table: Table, inverse: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Translate a state dict's names with ``table`` (theirs -> ours with ``inverse``).

    A source name matching several rows is written under each target. When several sources land
    on one target (tied copies), they must be equal.

    Returns:
        The renamed state and the source names that no row matched.
    """
    rules = _compile(tuple((b, a) for a, b in table) if inverse else table)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmatched = []
    for name, tensor in state.items():
        targets = [p.sub(dst, name, count=1) for p, dst in rules if p.match(name)]
        if not targets:
            unmatched.append(name)
        for target in targets:
            if target in out and not torch.equal(out[target], tensor):
                raise ValueError(
                    f"{name} and {origin[target]} are tied in this model ({target}) but differ; "
                    "the checkpoint's encoder and decoder were not trained with shared weights"
                )
            out[target], origin[target] = tensor, name
    return out, unmatched


# --- Hugging Face export -------------------------------------------------------------------


def hf_config(cfg: BlipConfig) -> Any:
    """The ``transformers.BlipConfig`` of our model configuration (same sizes, ids and norms)."""
    from transformers import BlipConfig as HfBlipConfig

    v, t = cfg.vision, cfg.text
    vision = dict(
        hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.depth,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act="gelu", layer_norm_eps=VIT_LAYER_NORM_EPS, attention_dropout=0.0,
    )
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, encoder_hidden_size=v.width,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, max_position_embeddings=t.max_position,
        hidden_act="gelu", layer_norm_eps=t.layer_norm_eps, hidden_dropout_prob=t.dropout,
        attention_probs_dropout_prob=t.dropout, bos_token_id=DEC_TOKEN_ID,
        eos_token_id=SEP_TOKEN_ID, sep_token_id=SEP_TOKEN_ID, pad_token_id=PAD_TOKEN_ID,
        is_decoder=True,  # HF builds the cross-attention layers only for a "decoder" config
        label_smoothing=cfg.label_smoothing,
    )
    return HfBlipConfig(
        text_config=text, vision_config=vision, image_text_hidden_size=cfg.embed_dim,
        label_smoothing=cfg.label_smoothing,
    )


def to_hf_model(model: BlipModel, task: HfTask) -> Any:
    """A ``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval`` holding our weights.

    Raises:
        ValueError: when a weight of the HF model is left without a value (never silently).
    """
    import transformers

    cls = (transformers.BlipForConditionalGeneration if task == "captioner"
           else transformers.BlipForImageTextRetrieval)
    state, _ = rename(model.state_dict(), hf_table(task))
    hf = cls(hf_config(model.cfg))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}
    if set(missing) - tied or unexpected:
        raise ValueError(f"HF {cls.__name__} does not fit: missing={sorted(set(missing) - tied)[:8]}, "
                         f"unexpected={unexpected[:8]}")
    if task == "captioner":  # the projection is the word embedding matrix itself
        head = hf.text_decoder.cls.predictions
        if head.decoder.weight is not hf.text_decoder.bert.embeddings.word_embeddings.weight:
            raise ValueError("HF captioner did not tie its output projection to the embeddings")
        with torch.no_grad():
            head.decoder.bias.copy_(head.bias)
    return hf.eval()


def export_hf(checkpoint: str | Path, out: str | Path, task: HfTask) -> Path:
    """Write a Hugging Face folder that ``transformers`` loads offline with no missing keys.

    The folder holds ``config.json`` (a ``BlipConfig``), ``model.safetensors``,
    ``generation_config.json`` (captioner), the tokenizer files and a ``BlipProcessor`` whose
    image processor resizes to our resolution and normalises as we do. Replaced atomically.

    Args:
        checkpoint: one of our checkpoint folders.
        out: the folder to write.
        task: ``captioner`` (``BlipForConditionalGeneration``: ViT + causal decoder + LM head)
            or ``retrieval`` (``BlipForImageTextRetrieval``: ViT + grounded encoder, ITC
            projections and ITM head; the filter).
    """
    from transformers import BlipImageProcessor, BlipProcessor

    from blip_core.checkpoint import TOKENIZER_DIR, load_model
    from blip_core.data.dataset import CLIP_MEAN, CLIP_STD
    from blip_core.tokenizer import load_tokenizer

    model = load_model(checkpoint)
    hf = to_hf_model(model, task)
    if task == "captioner":
        gen = hf.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = DEC_TOKEN_ID, SEP_TOKEN_ID, PAD_TOKEN_ID
    tokenizer = load_tokenizer(Path(checkpoint) / TOKENIZER_DIR)
    size = model.cfg.vision.image_size
    # Our evaluation transform: bicubic resize to a square, [0, 1], CLIP mean/std.
    images = BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(CLIP_MEAN),
                                image_std=list(CLIP_STD))
    with atomic_dir(out) as tmp:
        hf.save_pretrained(str(tmp))
        BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(tmp))
    return Path(out)


# --- official BLIP import ------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` (``{"model": {...}}`` or a bare state dict) or ``.safetensors``.

    Raises:
        ValueError: the file holds anything but tensors and plain containers (it is never
            unpickled beyond what ``weights_only=True`` allows), its weights are not a
            name -> tensor mapping, or a ``.safetensors`` file is malformed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as err:
        raise ValueError(f"refusing {path}: not a plain tensor checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state:
        raise ValueError(f"refusing {path}: expected a dict of tensors, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(f"refusing {path}: entries that are not name -> tensor: {bad[:5]}")
    return state


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {m.group(1) for k in state if (m := re.match(pattern, k))}
    return len(found)


def infer_config(
    state: Mapping[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    queue_size: int | None = None,
) -> BlipConfig:
    """Our config from a state dict in OUR names (sizes from shapes, depths from layer counts).

    Heads cannot be read from weights: by default one per 64 channels (ViT-B/L, BERT-base).
    """
    try:
        cls_token = state["visual_encoder.cls_token"]
        patch = state["visual_encoder.patch_embed.proj.weight"]
        pos = state["visual_encoder.pos_embed"]
        words = state["text_encoder.embeddings.word_embeddings.weight"]
        positions = state["text_encoder.embeddings.position_embeddings.weight"]
        fc1 = state["text_encoder.layers.0.mlp.fc1.weight"]
        vit_fc1 = state["visual_encoder.blocks.0.mlp.fc1.weight"]
    except KeyError as err:
        raise ValueError(f"not a BLIP checkpoint: {err.args[0]} is missing") from None
    width, patch_size = cls_token.shape[-1], patch.shape[-1]
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ValueError(f"position embedding of {pos.shape[1] - 1} patches is not a square grid")
    vision = VisionConfig(
        image_size=side * patch_size, patch_size=patch_size, width=width,
        depth=_count(state, r"^visual_encoder\.blocks\.(\d+)\."), heads=vision_heads or width // 64,
        mlp_ratio=vit_fc1.shape[0] / width,
    )
    hidden = words.shape[1]
    text = TextConfig(
        vocab_size=words.shape[0], hidden_size=hidden,
        num_layers=_count(state, r"^text_encoder\.layers\.(\d+)\."), num_heads=text_heads or hidden // 64,
        intermediate_size=fc1.shape[0], max_position=positions.shape[0],
    )
    defaults = BlipConfig()
    embed_dim = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else defaults.embed_dim
    if queue_size is None:
        queue_size = state["image_queue"].shape[1] if "image_queue" in state else defaults.queue_size
    return replace(defaults, vision=vision, text=text, embed_dim=embed_dim, queue_size=queue_size)


def _fit_queues(state: dict[str, torch.Tensor], size: int) -> None:
    """Truncate the ITC queues to ``size`` or extend them with random unit features."""
    if "image_queue" not in state or state["image_queue"].shape[1] == size:
        return
    have = state["image_queue"].shape[1]
    keep = min(have, size)
    for name in ("image_queue", "text_queue"):
        queue = state[name][:, :keep]
        extra = F.normalize(torch.randn(queue.shape[0], size - keep), dim=0)
        state[name] = torch.cat([queue, extra.to(queue.dtype)], dim=1)
    if "idx_queue" in state:
        idx = state["idx_queue"][:, :keep]
        state["idx_queue"] = torch.cat([idx, idx.new_full((1, size - keep), EMPTY_SLOT)], dim=1)
    if "queue_ptr" in state:
        state["queue_ptr"] = state["queue_ptr"] % size


def from_official(
    state: Mapping[str, torch.Tensor],
    vision_heads: int | None = None,
    text_heads: int | None = None,
    queue_size: int | None = None,
) -> tuple[BlipModel, list[str]]:
    """Build our model from an official BLIP state dict.

    Encoder/decoder copies of shared weights must be equal. Parts the checkpoint lacks (a
    captioner has no ITC/ITM heads, a retrieval model no decoder) keep their fresh
    initialisation; absent momentum encoders are copied from the online ones. Without an
    ``idx_queue`` (pre-training checkpoints) the queued features have no image ids: their slots
    are marked empty, which the ITC loss masks out.

    Returns:
        The model (eval mode) and the names of the parameters/buffers that were not in the file.
    """
    state = {_OFFICIAL_ALIASES.get(k, k): v for k, v in state.items()}
    if "idx_queue" in state:  # BLIP marks unfilled slots -100, we mark them EMPTY_SLOT
        idx = state["idx_queue"].reshape(1, -1).long()
        state["idx_queue"] = idx.masked_fill(idx == -100, EMPTY_SLOT)
    if "queue_ptr" in state:
        state["queue_ptr"] = state["queue_ptr"].reshape(1).long()
    ours, unmatched = rename(state, OFFICIAL_TABLE, inverse=True)
    unknown = [k for k in unmatched if not _OFFICIAL_IGNORED.search(k)]
    if unknown:
        raise ValueError(f"unknown keys for the official BLIP layout: {unknown[:8]}")
    if "text_encoder.layers.0.mlp.fc1.weight" not in ours:
        raise ValueError("checkpoint has neither text_encoder nor text_decoder weights")
    cfg = infer_config(ours, vision_heads, text_heads, queue_size)
    _fit_queues(ours, cfg.queue_size)
    model = BlipModel(cfg)
    target = model.state_dict()
    for online, twin in MOMENTUM_PAIRS:  # a missing momentum weight starts as its online twin
        for name in target:
            if name.startswith(twin + ".") and name not in ours:
                source = online + name[len(twin):]
                if source in ours or source in target:
                    ours[name] = ours.get(source, target[source])
    absent = [k for k in target if k not in ours]  # after the twins: copies count as present
    check_fits(target, ours)  # shapes, and no float weight stored as integers (or the reverse)
    model.load_state_dict({**target, **ours})
    return model.eval(), absent


def _summarise(names: Iterable[str]) -> list[str]:
    """Module paths of ``names`` with layer indices folded (``text_encoder.layers.*.self_attn``)."""
    return sorted({re.sub(r"\.\d+\.", ".*.", n).rsplit(".", 1)[0] for n in names})


def import_blip(
    pth: str | Path,
    out: str | Path,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    queue_size: int | None = None,
) -> Path:
    """Convert an official BLIP checkpoint file into one of our checkpoint folders.

    Args:
        pth: ``model_base*.pth`` (``{"model": state}`` or a bare state dict) or ``.safetensors``.
        out: the checkpoint folder to write (``config.json``, ``model.safetensors``, ``tokenizer/``).
        vision_heads / text_heads: attention heads, when not one per 64 channels.
        queue_size: resize the ITC queues (default: the checkpoint's own size).
    """
    from blip_core.checkpoint import save_checkpoint
    from blip_core.tokenizer import load_tokenizer

    model, absent = from_official(read_state_dict(pth), vision_heads, text_heads, queue_size)
    meta = {"source": "import-blip", "file": Path(pth).name, "sha256": sha256_file(pth),
            "initialised": _summarise(absent)}
    return save_checkpoint(out, model, load_tokenizer(), meta)


def to_official(model: BlipModel) -> dict[str, torch.Tensor]:
    """Our model's weights in the official BLIP layout (tied copies written out, as BLIP does)."""
    state, _ = rename(model.state_dict(), OFFICIAL_TABLE)
    return {k: v.detach().clone() for k, v in state.items()}


# --- CLI -----------------------------------------------------------------------------------


def export_main(argv: Sequence[str] | None = None) -> int:
    """``blip-core export-hf CHECKPOINT OUT --task captioner|retrieval``."""
    p = argparse.ArgumentParser(
        prog="blip-core export-hf",
        description="Export a checkpoint to a Hugging Face folder: BlipForConditionalGeneration "
                    "(captioner) or BlipForImageTextRetrieval (retrieval / filter).",
    )
    p.add_argument("checkpoint", type=Path, help="our checkpoint folder")
    p.add_argument("out", type=Path, help="HF folder to write (replaced atomically)")
    p.add_argument("--task", choices=["captioner", "retrieval"], required=True)
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = export_hf(args.checkpoint, args.out, args.task)
    cls = "BlipForConditionalGeneration" if args.task == "captioner" else "BlipForImageTextRetrieval"
    print(f"{cls} written to {out.resolve()}")
    return 0


def import_main(argv: Sequence[str] | None = None) -> int:
    """``blip-core import-blip PTH OUT``."""
    p = argparse.ArgumentParser(
        prog="blip-core import-blip",
        description="Import an official BLIP checkpoint (model_base*.pth layout) into a checkpoint "
                    "folder. Read with torch.load(weights_only=True): anything but tensors is refused.",
    )
    p.add_argument("pth", type=Path, help="official checkpoint (.pth or .safetensors)")
    p.add_argument("out", type=Path, help="checkpoint folder to write")
    p.add_argument("--vision-heads", type=int, help="ViT attention heads (default: width / 64)")
    p.add_argument("--text-heads", type=int, help="MED attention heads (default: hidden / 64)")
    p.add_argument("--queue-size", type=int, help="resize the ITC queues (default: as in the file)")
    args = p.parse_args(argv)
    out = import_blip(args.pth, args.out, args.vision_heads, args.text_heads, args.queue_size)
    from blip_core.checkpoint import read_config

    _, meta = read_config(out)
    if meta["initialised"]:
        print(f"not in the file, freshly initialised: {', '.join(meta['initialised'])}")
    print(f"checkpoint written to {out.resolve()}")
    return 0
