"""MLflow ``pyfunc`` models of a BLIP checkpoint, logged as *models from code*.

This file is the model's code: MLflow copies it into the logged model, beside the checkpoint
folder (``config.json``, ``model.safetensors``, ``tokenizer/``) as an artefact and ``blip_core``
as a code path. Loading runs this file and nothing is unpickled. It imports only ``mlflow``,
``pandas``, ``PIL``, ``torch`` and ``blip_core``, none of this repository's other packages, so a
model loads anywhere those are installed::

    model = mlflow.pyfunc.load_model("models:/blip-captioner@champion")
    model.predict(pd.DataFrame({"image": [jpeg_bytes]}))                 # -> caption
    filt = mlflow.pyfunc.load_model("models:/blip-filter@champion")
    filt.predict(pd.DataFrame({"image": [jpeg_bytes], "text": ["a red circle"]}))
    # -> match_probability

Tasks (``model_config["blip_task"]``): ``captioner`` (images -> captions), ``filter`` (image, text ->
ITM match probability) and ``med`` (image, text -> ITM match probability and ITC similarity).
Images are encoded image files (JPEG / PNG bytes); over REST they travel base64-encoded.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

TASKS = ("captioner", "filter", "med")
CHECKPOINT_ARTIFACT = "checkpoint"


def signature_for(task: str) -> ModelSignature:
    """The input / output schema (and inference parameters) of a task's pyfunc."""
    if task == "captioner":
        return ModelSignature(
            inputs=Schema([ColSpec("binary", "image")]),
            outputs=Schema([ColSpec("string", "caption")]),
            params=ParamSchema([
                ParamSpec("method", "string", "beam"),
                ParamSpec("max_length", "long", 20),
                ParamSpec("min_length", "long", 5),
                ParamSpec("top_p", "double", 0.9),
                ParamSpec("num_beams", "long", 3),
                ParamSpec("seed", "long", 0),
                ParamSpec("batch_size", "long", 32),
            ]),
        )
    if task in ("filter", "med"):
        outputs = [ColSpec("double", "match_probability")]
        if task == "med":
            outputs.append(ColSpec("double", "similarity"))
        return ModelSignature(
            inputs=Schema([ColSpec("binary", "image"), ColSpec("string", "text")]),
            outputs=Schema(outputs),
            params=ParamSchema([ParamSpec("batch_size", "long", 32)]),
        )
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


class BlipPyfunc(PythonModel):
    """A BLIP checkpoint behind the pyfunc interface of one task (see the module docstring)."""

    def load_context(self, context: PythonModelContext) -> None:
        import torch

        from blip_core.checkpoint import load_model
        from blip_core.data.dataset import image_transform
        from blip_core.tokenizer import load_tokenizer

        config = context.model_config or {}
        self.task = str(config.get("blip_task", ""))
        if self.task not in TASKS:
            raise ValueError(f"model_config task {self.task!r} is not one of {TASKS}")
        path = context.artifacts[CHECKPOINT_ARTIFACT]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(path).to(self.device).eval()
        self.tokenizer = load_tokenizer(f"{path}/tokenizer")
        self.transform = image_transform(self.model.cfg.vision.image_size)

    def _images(self, column: pd.Series) -> Any:
        import torch
        from PIL import Image

        def decode(data: Any) -> Any:
            if isinstance(data, str):  # a binary column read back from JSON
                import base64

                data = base64.b64decode(data)
            with Image.open(io.BytesIO(bytes(data))) as im:
                return self.transform(im.convert("RGB"))

        return torch.stack([decode(d) for d in column]).to(self.device)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        params = params or {}
        batch = max(1, int(params.get("batch_size", 32)))
        rows = [model_input.iloc[i : i + batch] for i in range(0, len(model_input), batch)]
        parts = [self._predict_batch(r, params) for r in rows]
        if not parts:
            return pd.DataFrame({c: [] for c in signature_for(self.task).outputs.input_names()})
        return pd.concat(parts, ignore_index=True)

    def _predict_batch(self, rows: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        import torch

        images = self._images(rows["image"])
        if self.task == "captioner":
            from blip_core.generate import generate_captions

            method = str(params.get("method", "beam"))
            generator = torch.Generator(device=self.device).manual_seed(int(params.get("seed", 0)))
            captions = generate_captions(
                self.model, self.tokenizer, images, method=method,  # type: ignore[arg-type]
                max_length=int(params.get("max_length", 20)),
                min_length=int(params.get("min_length", 5)),
                top_p=float(params.get("top_p", 0.9)), num_beams=int(params.get("num_beams", 3)),
                generator=generator,
            )
            return pd.DataFrame({"caption": [c[0] for c in captions]})
        from blip_core.filtering import itm_probabilities

        texts = [[str(t)] for t in rows["text"]]
        probs = itm_probabilities(self.model, self.tokenizer, images, texts)
        out = pd.DataFrame({"match_probability": [float(p.reshape(-1)[0]) for p in probs]})
        if self.task == "med":
            out["similarity"] = self._similarity(images, [t[0] for t in texts])
        return out

    def _similarity(self, images: Any, texts: list[str]) -> list[float]:
        """Cosine similarity of the ITC features of each (image, text) row."""
        import torch

        from blip_core.tokenizer import pre_caption

        tok = self.tokenizer([pre_caption(t) for t in texts], padding="longest", truncation=True,
                             max_length=self.model.cfg.max_text_len, return_tensors="pt").to(self.device)
        with torch.no_grad():
            image_feat = self.model.image_features(self.model.encode_image(images))
            text_feat = self.model.text_features(tok.input_ids, tok.attention_mask)
        return (image_feat * text_feat).sum(-1).float().cpu().tolist()


set_model(BlipPyfunc())
