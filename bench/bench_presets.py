"""Training-step time and peak memory of each model preset on this machine.

Each preset runs in its own subprocess (so its peak RSS is its own): build the model, run warm-up
steps, then time full ITC + ITM + LM steps (forward, backward, AdamW). Writes
``bench/PRESETS.md`` and ``bench/presets.json``.

    python bench/bench_presets.py [--presets tiny base] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = {"tiny": 64, "base": 8, "large": 4}


def machine() -> str:
    """CPU model and core count, or the GPU name."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def measure(preset: str, steps: int, warmup: int) -> dict:
    """Run in the child: time ``steps`` training steps of ``preset``."""
    import torch

    from blip_core.config import model_preset
    from blip_core.model import BlipModel, count_parameters
    from blip_core.tokenizer import load_tokenizer
    from blip_core.train import Collator

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_preset(preset)
    model = BlipModel(cfg).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    b = BATCH[preset]
    size = cfg.vision.image_size
    captions = ["a large red circle to the left of a small blue square"] * b
    items = [(torch.randn(3, size, size), captions[i], i) for i in range(b)]
    batch = Collator(load_tokenizer(), cfg.max_text_len, cfg.prompt)(items).to(device)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        out = model(batch, alpha=0.4)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "preset": preset, "batch": b, "image_size": size,
        "params_m": round(count_parameters(model) / 1e6, 2),
        "step_s_median": round(statistics.median(times), 3), "step_s_min": round(min(times), 3),
        "samples_per_s": round(b / statistics.median(times), 1),
        "peak_memory_mib": round(peak_mib), "memory_kind": "cuda allocated" if device.type == "cuda"
        else "process max RSS", "machine": machine(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup)))
        return
    rows = []
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--child", preset, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["| preset | params (M) | batch | image | step (s, median) | samples/s | peak memory (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params_m']} | {r['batch']} | {r['image_size']} | "
                     f"{r['step_s_median']} | {r['samples_per_s']} | {r['peak_memory_mib']} |")
    text = (f"# Training step per preset\n\nMachine: {rows[0]['machine']}. A step is ITC + ITM + LM "
            f"forward and backward plus AdamW; memory is the {rows[0]['memory_kind']}.\n\n"
            + "\n".join(lines) + "\n")
    (HERE / "PRESETS.md").write_text(text)
    (HERE / "presets.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
