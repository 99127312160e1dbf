"""Throughput of blip_core against the Hugging Face ``transformers`` BLIP modules, side by side.

Both sides run in one process on the same configuration, the same weights (the HF models are
built from ours by :func:`blip_core.interop.to_hf_model`, the code behind ``blip-core export-hf``)
and the same inputs. Each row: warm-up, then N repeats that alternate which side goes first,
median time. Rows:

* ``train step``: ITC + ITM + LM forward and backward on one batch (no optimizer step).
  Ours: ``BlipModel.forward`` + ``backward``. Peer (:class:`HfPretrainStep`), the same recipe
  composed from HF modules: ``BlipForImageTextRetrieval``'s ``vision_model`` (one ViT forward),
  ``text_encoder`` without image (ITC features) and with cross-attention ([ENC] first, ITM on
  positives + one hard negative text per image + one hard negative image per text),
  ``vision_proj`` / ``text_proj`` / ``itm_head``; momentum copies of the ViT, text encoder and
  projections (EMA 0.995) and the feature queues; ``BlipForConditionalGeneration``'s
  ``text_decoder`` (causal self-attention, cross-attention, tied LM head, HF's own label-smoothed
  loss) on "[DEC] a picture of <caption>". The loss maths and the hard-negative sampling are
  blip_core's on both sides; before timing, both sides' three losses are checked equal.
* ``caption``: generated tokens/s. Ours: ``generate_captions``; peer:
  ``BlipForConditionalGeneration.generate``; same prompt, same method (beam 3 or greedy), and
  ``min_length = max_length`` so that both generate exactly the same number of tokens. Strings
  are decoded on both sides.
* ``filter``: image-text pairs/s of ITM probabilities, one text per image, tokenisation
  included. Ours: ``itm_probabilities``; peer: ``BlipForImageTextRetrieval(use_itm_head=True)``
  (its forward encodes the image of every pair) + softmax.
* ``filter_capfilt``: the same with the shape of CapFilt's work, two texts per image (its web
  text and a caption; here another image's caption stands in): ours encodes each image once,
  the peer is given each image twice, as its paired inputs require.
* modes: before each row both sides' models are put in the row's mode (training; eval for the
  inference rows, as ``load_for_inference`` gives them), and no timed call switches modes.
* peak memory of each row: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated
  before the call; on CPU the peak resident-set growth during one call, sampled every
  millisecond in a fresh subprocess per side (glibc told to return freed blocks at once).

Writes ``bench/RESULTS.md``, ``bench/results.json`` and the runs' sanity notes to
``bench/notes.json`` (rows of other machines / configurations are kept; rows with the same name
and machine are replaced). ``ratio`` is ours / peer. ``--quick`` writes nothing.

Usage::

    python bench/bench_throughput.py                      # tiny preset, CPU, fp32
    python bench/bench_throughput.py --quick              # smoke run
    python bench/bench_throughput.py --preset base --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip_core.config import DEC_TOKEN_ID, ENC_TOKEN_ID, PAD_TOKEN_ID, model_preset
from blip_core.filtering import itm_probabilities
from blip_core.generate import generate_captions
from blip_core.interop import to_hf_model
from blip_core.losses import (
    ItcLoss,
    ItmLoss,
    lm_labels,
    positive_mask,
    sample_hard_negatives,
    soft_targets,
)
from blip_core.model import EMPTY_SLOT, BlipModel, TextBatch
from blip_core.tokenizer import load_tokenizer
from blip_core.train import Collator

HERE = Path(__file__).resolve().parent
ROWS = ("train", "caption_beam", "caption_greedy", "filter", "filter_capfilt")
TEXTS_PER_IMAGE = {"filter": 1, "filter_capfilt": 2}  # the filter rows
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
PLACES = ("on the left", "on the right", "at the top", "in the middle", "at the bottom")


@dataclass(frozen=True)
class Settings:
    """One benchmark configuration (the same for both sides)."""

    preset: str
    device: str
    dtype: str  # fp32 | bf16
    batch: int  # training batch / images per captioning and filtering call
    gen_tokens: int  # tokens generated per caption (min_length = max_length)
    warmup: int
    repeats: int

    @property
    def bf16(self) -> bool:
        return self.dtype == "bf16"

    @property
    def tag(self) -> str:
        return f"{self.preset}, {self.dtype}, batch {self.batch}"


# --- the peer: BLIP pre-training composed from transformers modules -----------------------


class HfPretrainStep(nn.Module):
    """BLIP's ITC + ITM + LM step on ``transformers`` BLIP modules, loss maths as blip_core's."""

    def __init__(self, ours: BlipModel) -> None:
        super().__init__()
        retrieval, captioner = to_hf_model(ours, "retrieval"), to_hf_model(ours, "captioner")
        self.cfg = ours.cfg
        self.vision = retrieval.vision_model
        self.text = retrieval.text_encoder
        self.vision_proj, self.text_proj, self.itm_head = (
            retrieval.vision_proj, retrieval.text_proj, retrieval.itm_head)
        self.decoder = captioner.text_decoder  # its own copy of the shared MED weights
        self.pairs = (("vision", "vision_m"), ("vision_proj", "vision_proj_m"),
                      ("text", "text_m"), ("text_proj", "text_proj_m"))
        for online, twin in self.pairs:
            setattr(self, twin, copy.deepcopy(getattr(self, online)).requires_grad_(False))
        self.temp = nn.Parameter(ours.temp.detach().clone())
        for name in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
            self.register_buffer(name, getattr(ours, name).detach().clone())
        self.itc_loss, self.itm_loss = ItcLoss(), ItmLoss()

    def _features(self, vision: nn.Module, vision_proj: nn.Module, text: nn.Module,
                  text_proj: nn.Module, batch: TextBatch) -> tuple[torch.Tensor, ...]:
        image_embeds = vision(pixel_values=batch.images).last_hidden_state
        hidden = text(input_ids=batch.text_ids, attention_mask=batch.text_mask).last_hidden_state
        return (image_embeds, F.normalize(vision_proj(image_embeds[:, 0]), dim=-1),
                F.normalize(text_proj(hidden[:, 0]), dim=-1))

    def forward(self, batch: TextBatch, alpha: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds, image_feat, text_feat = self._features(
            self.vision, self.vision_proj, self.text, self.text_proj, batch)
        # ITC with momentum encoders and queues.
        idx = batch.image_idx
        idx_all = torch.cat([idx, self.idx_queue[0]])
        positives = positive_mask(idx, idx_all)
        empty = (idx_all == EMPTY_SLOT)[None]
        with torch.no_grad():
            for online, twin in self.pairs:
                params_m = list(getattr(self, twin).parameters())
                torch._foreach_mul_(params_m, self.cfg.momentum)
                torch._foreach_add_(params_m, [p.detach() for p in getattr(self, online).parameters()],
                                    alpha=1.0 - self.cfg.momentum)
            _, image_feat_m, text_feat_m = self._features(
                self.vision_m, self.vision_proj_m, self.text_m, self.text_proj_m, batch)
            image_all = torch.cat([image_feat_m.t(), self.image_queue.clone()], dim=1)
            text_all = torch.cat([text_feat_m.t(), self.text_queue.clone()], dim=1)
            t_i2t = soft_targets((image_feat_m @ text_all / self.temp).masked_fill(empty, -torch.inf),
                                 positives, alpha)
            t_t2i = soft_targets((text_feat_m @ image_all / self.temp).masked_fill(empty, -torch.inf),
                                 positives, alpha)
        sim_i2t = (image_feat @ text_all / self.temp).masked_fill(empty, -torch.inf)
        sim_t2i = (text_feat @ image_all / self.temp).masked_fill(empty, -torch.inf)
        loss_itc = self.itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i)
        with torch.no_grad():
            n, q = idx.shape[0], self.cfg.queue_size
            slots = (self.queue_ptr[0] + torch.arange(n, device=idx.device)) % q
            self.image_queue[:, slots] = image_feat_m.t().to(self.image_queue.dtype)
            self.text_queue[:, slots] = text_feat_m.t().to(self.text_queue.dtype)
            self.idx_queue[0, slots] = idx
            self.queue_ptr[0] = (self.queue_ptr[0] + n) % q
        # ITM on positives and hard negatives, through the cross-attention text encoder.
        bsz = image_embeds.shape[0]
        with torch.no_grad():
            pos = positive_mask(idx, idx)
            sim = image_feat @ text_feat.t() / self.temp
            neg_text, neg_image = sample_hard_negatives(sim, pos), sample_hard_negatives(sim.t(), pos)
        rows = torch.arange(bsz, device=idx.device)
        img_rows, txt_rows = rows[neg_image >= 0], rows[neg_text >= 0]
        images = torch.cat([image_embeds, image_embeds[neg_image[img_rows]], image_embeds[txt_rows]])
        ids = torch.cat([batch.text_ids, batch.text_ids[img_rows], batch.text_ids[neg_text[txt_rows]]])
        mask = torch.cat([batch.text_mask, batch.text_mask[img_rows], batch.text_mask[neg_text[txt_rows]]])
        ids = ids.clone()
        ids[:, 0] = ENC_TOKEN_ID
        hidden = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=images).last_hidden_state
        logits = self.itm_head(hidden[:, 0])
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:bsz] = 1
        loss_itm = self.itm_loss(logits, labels)
        # LM: HF's decoder and its own (label-smoothed, shifted) loss.
        dec_ids = batch.lm_ids.clone()
        dec_ids[:, 0] = DEC_TOKEN_ID
        lm = self.decoder(input_ids=dec_ids, attention_mask=batch.lm_mask, encoder_hidden_states=image_embeds,
                          labels=lm_labels(batch.lm_ids, PAD_TOKEN_ID, batch.prompt_length))
        return {"itc": loss_itc, "itm": loss_itm, "lm": lm.loss}


# --- workloads -----------------------------------------------------------------------------


def captions(n: int) -> list[str]:
    """``n`` shapes-world-like captions of varied lengths (deterministic)."""
    out = []
    for i in range(n):
        c, s, p = COLOURS[i % 6], SHAPES[(i // 6) % 4], PLACES[(i * 7) % 5]
        extra = f" next to a small {COLOURS[(i + 3) % 6]} {SHAPES[(i + 1) % 4]}" if i % 3 == 0 else ""
        out.append(f"a {'big ' if i % 2 else ''}{c} {s} {p}{extra}")
    return out


class Workloads:
    """Both sides of every row, on shared models and inputs."""

    def __init__(self, s: Settings, tokenizer_dir: str | None) -> None:
        torch.manual_seed(0)
        self.s = s
        self.device = torch.device(s.device)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.ours = BlipModel(model_preset(s.preset)).to(self.device)
        self.peer_train = HfPretrainStep(self.ours).to(self.device)
        self.peer_caption = to_hf_model(self.ours, "captioner").to(self.device)
        self.peer_filter = to_hf_model(self.ours, "retrieval").to(self.device)
        cfg = self.ours.cfg
        g = torch.Generator().manual_seed(0)
        images = torch.randn(s.batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
        self.texts = captions(s.batch)
        collate = Collator(self.tokenizer, cfg.max_text_len, cfg.prompt)
        self.batch = collate(list(zip(images, self.texts, range(s.batch), strict=True))).to(self.device)
        self.images = self.batch.images
        prompts = self.tokenizer([cfg.prompt] * s.batch, return_tensors="pt")
        self.prompt_ids = prompts.input_ids.to(self.device)  # [CLS] a picture of [SEP]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.s.bf16)

    def prepare(self, row: str) -> None:
        """Both sides' models in the mode of the row (training, or eval as loaded for inference),
        set once before it: neither side pays for switching modes inside a timed call."""
        training = row == "train"
        for model in (self.ours, self.peer_train, self.peer_caption, self.peer_filter):
            model.train(training)

    # Training step.
    def ours_train(self) -> None:
        self.ours.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.ours(self.batch, alpha=0.4).loss
        loss.backward()

    def peer_train_step(self) -> None:
        self.peer_train.zero_grad(set_to_none=True)
        with self.autocast():
            loss = sum(self.peer_train(self.batch, alpha=0.4).values())
        loss.backward()

    def check_train(self) -> str:
        """Both sides' loss terms at the same weights, RNG and queues (eval mode: no dropout)."""
        self.ours.eval()
        self.peer_train.eval()
        torch.manual_seed(1)
        ours = self.ours(self.batch, alpha=0.4)
        torch.manual_seed(1)
        peer = self.peer_train(self.batch, alpha=0.4)
        values = {k: (float(getattr(ours, f"loss_{k}").detach()), float(v.detach())) for k, v in peer.items()}
        worst = max(abs(a - b) for a, b in values.values())
        if worst > 1e-3:
            raise AssertionError(f"the two training steps compute different losses: {values}")
        return f"train losses agree, max |Δ| {worst:.1e} (" + ", ".join(
            f"{k} {a:.4f}" for k, (a, _) in values.items()) + ")"

    # Captioning.
    def _gen_kwargs(self, method: str) -> dict[str, Any]:
        return dict(num_beams=3 if method == "beam" else 1, max_length=self.s.gen_tokens,
                    min_length=self.s.gen_tokens)

    def ours_caption(self, method: str) -> list[str]:
        kw = self._gen_kwargs(method)
        out = generate_captions(self.ours, self.tokenizer, self.images, method=method,  # type: ignore[arg-type]
                                num_beams=kw["num_beams"], max_length=kw["max_length"],
                                min_length=kw["min_length"], repetition_penalty=1.0, bf16=self.s.bf16)
        return [c[0] for c in out]

    def peer_caption_call(self, method: str) -> list[str]:
        kw = self._gen_kwargs(method)
        with torch.inference_mode(), self.autocast():
            ids = self.peer_caption.generate(
                pixel_values=self.images, input_ids=self.prompt_ids.clone(), do_sample=False,
                num_beams=kw["num_beams"], max_new_tokens=kw["max_length"],
                min_new_tokens=kw["min_length"], repetition_penalty=1.0, length_penalty=1.0,
                early_stopping=False)
        prompt_len = self.prompt_ids.shape[1] - 1  # [DEC] + prompt words
        texts = self.tokenizer.batch_decode(ids[:, prompt_len:].tolist(), skip_special_tokens=True)
        return [t.strip().lower() for t in texts]

    # Filtering.
    def filter_texts(self, per_image: int) -> list[list[str]]:
        """Each image's texts: its own caption, then (CapFilt) another image's as a stand-in for
        its synthetic caption."""
        n = len(self.texts)
        return [[self.texts[(i + k) % n] for k in range(per_image)] for i in range(n)]

    def ours_filter(self, per_image: int = 1) -> torch.Tensor:
        probs = itm_probabilities(self.ours, self.tokenizer, self.images,
                                  self.filter_texts(per_image), bf16=self.s.bf16)
        return torch.cat(probs)

    def peer_filter_call(self, per_image: int = 1) -> torch.Tensor:
        texts = [t for group in self.filter_texts(per_image) for t in group]
        enc = self.tokenizer(texts, padding="longest", truncation=True,
                             max_length=self.ours.cfg.max_text_len, return_tensors="pt").to(self.device)
        ids = enc.input_ids
        ids[:, 0] = ENC_TOKEN_ID  # HF's retrieval model leaves the first token to the caller
        images = self.images if per_image == 1 else self.images.repeat_interleave(per_image, 0)
        with torch.inference_mode(), self.autocast():
            logits = self.peer_filter(input_ids=ids, pixel_values=images,
                                      attention_mask=enc.attention_mask, use_itm_head=True).itm_score
        return logits.float().softmax(-1)[:, 1].cpu()

    def sides(self, row: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
        """(ours, peer) callables of a row."""
        if row == "train":
            return self.ours_train, self.peer_train_step
        if row.startswith("caption_"):
            method = row.split("_", 1)[1]
            return (lambda: self.ours_caption(method)), (lambda: self.peer_caption_call(method))
        if row in TEXTS_PER_IMAGE:
            n = TEXTS_PER_IMAGE[row]
            return (lambda: self.ours_filter(n)), (lambda: self.peer_filter_call(n))
        raise ValueError(row)

    def work(self, row: str) -> tuple[float, str]:
        """Units of work per call of a row, and the unit."""
        if row == "train":
            return self.s.batch, "samples/s"
        if row.startswith("caption_"):
            return self.s.batch * self.s.gen_tokens, "tokens/s"
        return self.s.batch * TEXTS_PER_IMAGE[row], "pairs/s"


ROW_TITLES = {
    "train": "train step ITC+ITM+LM fwd+bwd",
    "caption_beam": "caption, beam 3",
    "caption_greedy": "caption, greedy",
    "filter": "filter ITM scoring",
    "filter_capfilt": "filter ITM scoring, 2 texts per image (CapFilt: web text + caption)",
}


# --- timing and memory ---------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: tuple[Callable[[], Any], Callable[[], Any]], warmup: int, repeats: int,
                device: torch.device) -> tuple[float, float]:
    """Median seconds of each callable: warm-up, then repeats alternating which goes first."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[], []]
    for r in range(repeats):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            _sync(device)
            start = time.perf_counter()
            fns[i]()
            _sync(device)
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def rss_peak() -> Iterator[dict[str, float]]:
    """Yields a dict whose ``mib`` is, after the block, the peak RSS growth during it."""
    result = {"mib": 0.0}
    base, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss())
        result["mib"] = (peak[0] - base) / 2**20


def cuda_peak(fn: Callable[[], Any], device: torch.device) -> float:
    """MiB allocated by ``fn`` at its peak, above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cpu_peak_in_subprocess(row: str, side: str, argv: list[str]) -> float | None:
    """Peak RSS growth of one call of ``side`` of ``row`` in a fresh process (None on failure)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--probe", f"{row}:{side}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("PROBE "):
            return float(line.split()[1])
    print(f"memory probe {row}:{side} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def probe(w: Workloads, row: str, side: str) -> None:
    """Child process: warm up once, then print the RSS growth of one call."""
    ours, peer = w.sides(row)
    fn = ours if side == "ours" else peer
    w.prepare(row)
    fn()
    if row == "train":  # drop the gradients, so that both calls start from the same state
        (w.ours if side == "ours" else w.peer_train).zero_grad(set_to_none=True)
    with rss_peak() as peak:
        fn()
    print(f"PROBE {peak['mib']:.1f}")


# --- report --------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    """GPU name, or CPU model and core count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    model = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def write_results(rows: list[dict[str, Any]], notes: list[str], out_dir: Path, fresh: bool) -> None:
    """Merge ``rows`` into results.json (same name + machine replaced) and rewrite RESULTS.md."""
    path = out_dir / "results.json"
    old = [] if fresh or not path.exists() else json.loads(path.read_text())
    keys = {(r["name"], r["machine"]) for r in rows}
    merged = [r for r in old if (r["name"], r["machine"]) not in keys] + rows
    path.write_text(json.dumps(merged, indent=2) + "\n")
    notes_path = out_dir / "notes.json"
    all_notes = {} if fresh or not notes_path.exists() else json.loads(notes_path.read_text())
    all_notes[rows[0]["machine"] + " | " + rows[0]["name"].split("[", 1)[-1].rstrip("]")] = notes
    notes_path.write_text(json.dumps(all_notes, indent=2) + "\n")

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:,.1f}" if x >= 10 else f"{x:.3g}"

    lines = [
        "# Throughput: blip_core vs transformers BLIP",
        "",
        "Written by `bench/bench_throughput.py` (see its docstring for exactly what each side "
        "computes). Same configuration, weights and inputs on both sides, one process, "
        "interleaved repeats, median. **ratio = ours / peer**: above 1 is better for throughput "
        "rows, below 1 is better for memory rows.",
        "",
        "| name | ours | peer | ratio | unit | machine |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in merged:
        lines.append(f"| {r['name']} | {fmt(r['ours'])} | {fmt(r['peer'])} | {fmt(r['ratio'])} | "
                     f"{r['unit']} | {r['machine']} |")
    lines += ["", "## Notes", ""]
    for run, run_notes in all_notes.items():
        lines.append(f"- {run}:")
        lines += [f"  - {n}" for n in run_notes]
    (out_dir / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    p.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 64 on CUDA")
    p.add_argument("--gen-tokens", type=int, default=20, help="tokens per caption (default 20)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 4, 1 warm-up, 3 repeats, "
                                                        "6 tokens, no CPU memory probes, no files")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tokenizer", help="a saved tokenizer folder (default: the bundled BERT vocab)")
    p.add_argument("--out", type=Path, default=HERE, help="folder of RESULTS.md / results.json")
    p.add_argument("--fresh", action="store_true", help="drop rows of earlier runs from the results")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from blip_core.env import set_defaults

    set_defaults()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (4 if args.quick else 64 if device.type == "cuda" else 16)
    s = Settings(preset=args.preset, device=args.device, dtype=args.dtype, batch=batch,
                 gen_tokens=6 if args.quick else args.gen_tokens,
                 warmup=1 if args.quick else args.warmup, repeats=3 if args.quick else args.repeats)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}")
    w = Workloads(s, args.tokenizer)
    if args.probe:
        row, side = args.probe.split(":")
        probe(w, row, side)
        return 0

    where = machine(device)
    notes = ["bf16 autocast"] if s.bf16 else []
    import timm
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}"
    notes.insert(0, versions)
    notes += [f"{s.warmup} warm-up + {s.repeats} interleaved repeats per row, median; "
             f"{torch.get_num_threads()} torch threads; "
             f"captions of exactly {s.gen_tokens} tokens (min_length = max_length)"]
    results: list[dict[str, Any]] = []
    child_argv = [a for a in argv if a not in ("--fresh", "--no-write")]
    for row in rows:
        if row == "train":
            notes.append(w.check_train())
        w.prepare(row)
        ours_fn, peer_fn = w.sides(row)
        if row.startswith(("caption_", "filter")):
            a, b = ours_fn(), peer_fn()
            if row.startswith("filter"):
                notes.append(f"{ROW_TITLES[row]}: probabilities agree to "
                             f"{float((a - b).abs().max()):.1e}")
            else:
                same = sum(x == y for x, y in zip(a, b, strict=True))
                notes.append(f"{ROW_TITLES[row]}: {same}/{len(a)} captions identical on both sides")
        t_ours, t_peer = interleaved((ours_fn, peer_fn), s.warmup, s.repeats, device)
        work, unit = w.work(row)
        name = f"{ROW_TITLES[row]} [{s.tag}]"
        results.append(dict(name=name, ours=work / t_ours, peer=work / t_peer,
                            ratio=t_peer / t_ours, unit=unit, machine=where))
        print(f"{name}: ours {work / t_ours:,.1f} {unit}, peer {work / t_peer:,.1f} {unit}, "
              f"ratio {t_peer / t_ours:.2f}", flush=True)
        if args.no_memory:
            continue
        if device.type == "cuda":
            if row == "train":
                w.ours.zero_grad(set_to_none=True)
                w.peer_train.zero_grad(set_to_none=True)
            m_ours, m_peer = cuda_peak(ours_fn, device), cuda_peak(peer_fn, device)
            how = "peak memory"
        elif args.quick:
            m_ours = m_peer = None
            how = "peak memory (skipped by --quick)"
        else:
            m_ours = cpu_peak_in_subprocess(row, "ours", child_argv)
            m_peer = cpu_peak_in_subprocess(row, "peer", child_argv)
            how = "peak RSS growth"
        ratio = m_ours / m_peer if m_ours is not None and m_peer else None
        results.append(dict(name=f"{ROW_TITLES[row]}, {how} [{s.tag}]", ours=m_ours, peer=m_peer,
                            ratio=ratio, unit="MiB", machine=where))
        print(f"  memory: ours {m_ours} MiB, peer {m_peer} MiB", flush=True)
    for n in notes:
        print("note:", n)
    if not (args.no_write or args.quick):
        write_results(results, notes, args.out, args.fresh)
        print(f"written to {args.out / 'RESULTS.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
