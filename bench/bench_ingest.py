"""Ingest throughput and output size per 10,000 web samples on this machine.

Writes img2dataset-shaped shards of N samples (an RGB JPEG, a caption, a .json and the parquet
beside each shard) at a few image sizes and kinds, then times ``blip_core.data.ingest.ingest``
on them (one process, what ``blip-core ingest`` and the ``web_shards`` asset run). RGB JPEGs are
stored byte for byte; PNGs are decoded and re-encoded as JPEG, the slow path. Writes
``bench/INGEST.md`` and ``bench/ingest.json``.

    python bench/bench_ingest.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
CASES = {  # name -> (side in pixels, format img2dataset stored)
    "shapes world, 64 px JPEG": (64, "JPEG"),
    "img2dataset default, 256 px JPEG": (256, "JPEG"),
    "img2dataset keep_ratio, 384 px JPEG": (384, "JPEG"),
    "img2dataset encode_format png, 256 px PNG": (256, "PNG"),
}


def _machine() -> str:
    import os

    model = platform.processor() or "cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {os.cpu_count()} cores"


def _shards(root: Path, n: int, side: int, fmt: str) -> int:
    """Writes ``n`` samples in shards of 1,000; returns the bytes written."""
    from blip_core.data.formats import Sample, ShardWriter, shard_key

    rng = np.random.default_rng(0)
    coarse = Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.BICUBIC), dtype=np.float64)
    base = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)  # photo-like
    for start in range(0, n, 1000):
        with ShardWriter(root / f"{start // 1000:05d}.tar") as w:
            for i in range(start, min(n, start + 1000)):
                img = np.roll(base, i, axis=1)  # distinct images of the same statistics
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format=fmt, quality=90)
                key = shard_key(start // 1000, i - start, 1000)
                if fmt == "JPEG":
                    w.write(Sample(key, buf.getvalue(), f"a photo number {i}", {"url": f"http://x/{i}"}))
                else:  # img2dataset's encode_format=png: a .png member
                    meta = json.dumps({"key": key, "url": f"http://x/{i}"}).encode()
                    members = (("json", meta), ("png", buf.getvalue()), ("txt", f"a photo {i}".encode()))
                    for ext, data in members:
                        w.add_member(f"{key}.{ext}", data)
                    w.rows.append({"key": key, "caption": f"a photo {i}", "status": "success"})
    return sum(p.stat().st_size for p in root.iterdir())


def main(argv: list[str] | None = None) -> int:
    from blip_core.data.ingest import ingest

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000, help="samples per case")
    args = p.parse_args(argv)
    rows = []
    for name, (side, fmt) in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "src", Path(tmp) / "out"
            src.mkdir()
            size_in = _shards(src, args.samples, side, fmt)
            start = time.perf_counter()
            stats = ingest(src, out)
            seconds = time.perf_counter() - start
            size_out = sum(f.stat().st_size for f in out.iterdir())
        assert stats.kept == args.samples, stats.to_json()
        per_10k = 10_000 / args.samples
        rows.append({"case": name, "samples": args.samples, "samples_per_s": round(args.samples / seconds, 1),
                     "seconds_per_10k": round(seconds * per_10k, 1),
                     "input_mb_per_10k": round(size_in * per_10k / 2**20, 1),
                     "output_mb_per_10k": round(size_out * per_10k / 2**20, 1)})
        print(rows[-1], flush=True)
    machine = _machine()
    (HERE / "ingest.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    lines = ["# Ingest per 10,000 web samples", "",
             f"Machine: {machine}; one process. `python bench/bench_ingest.py --samples {args.samples}`.", "",
             "| case | samples/s | s per 10k | input MB per 10k | output MB per 10k |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['samples_per_s']} | {r['seconds_per_10k']} | {r['input_mb_per_10k']} | "
              f"{r['output_mb_per_10k']} |" for r in rows]
    (HERE / "INGEST.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
