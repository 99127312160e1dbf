"""``blip-core`` as a user types it: a bad input is one line on stderr and exit status 2, an
ingest that keeps nothing exits 1, and genuine bugs still surface as tracebacks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tar
from PIL import Image

from blip_core import cli
from blip_core.cli import main
from blip_core.data.formats import Sample, write_shards
from blip_core.errors import UsageError

HINT = "give a folder of img2dataset .tar shards, one .tar, or an annotations .json"


def _jpeg(size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 160, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _one_error_line(err: str, command: str) -> str:
    """The single stderr line of a bad-input error, without its ``blip-core COMMAND: error: ``."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = f"blip-core {command}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix):]


def test_missing_source_is_one_line_and_exit_2_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "blip_core.cli", "ingest", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"blip-core ingest: error: {tmp_path / 'nope'} does not exist; {HINT}\n"
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


def test_out_of_range_option_is_an_argparse_error_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "blip_core.cli", "synth", "--out", str(tmp_path / "w"),
                           "--web-noise", "1.5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last == "blip-core synth: error: argument --web-noise: 1.5 is outside [0, 1]"
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    ("src", "files", "message"),
    [
        ("missing", (), "{src} does not exist; " + HINT),
        ("missing.json", (), "{src} does not exist; " + HINT),
        ("empty", ("empty/",), "{src} holds no .tar shards; " + HINT),
        ("landing", ("landing/00000.parquet", "landing/annotations.json"),
         "{src} holds no .tar shards; " + HINT),
        ("00000.parquet", ("00000.parquet",),
         "{src} is not a .tar shard (the parquet beside a shard only lists its samples); " + HINT),
        ("00000.tgz", ("00000.tgz",), "{src} is not a .tar shard; " + HINT),
    ],
)
def test_ingest_bad_source_names_it_and_what_to_give(
    src: str, files: tuple[str, ...], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in files:
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).parent.mkdir(exist_ok=True)
            (tmp_path / name).write_bytes(b"PAR1")
    assert main(["ingest", str(tmp_path / src), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert _one_error_line(captured.err, "ingest") == message.format(src=tmp_path / src)
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_ingest_options_of_a_json_source_refused_for_shards(tmp_path: Path, capsys) -> None:
    write_shards([Sample("a", _jpeg(), "a green square")], tmp_path / "web", shard_size=4)
    assert main(["ingest", str(tmp_path / "web"), "--out", str(tmp_path / "out"), "--split", "val"]) == 2
    assert _one_error_line(capsys.readouterr().err, "ingest") == (
        "--image-root and --split apply to an annotations .json, not to web shards")


def test_ingest_missing_image_root_is_a_usage_error(tmp_path: Path, capsys) -> None:
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps([{"image": "a.jpg", "caption": ["c"], "split": "train"}]))
    rc = main(["ingest", str(ann), "--image-root", str(tmp_path / "images"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert _one_error_line(capsys.readouterr().err, "ingest").startswith(
        f"image root {tmp_path / 'images'} is not a folder")


def test_ingest_that_keeps_nothing_exits_1_and_points_at_the_quarantine(tmp_path: Path, capsys) -> None:
    src = write_tar(tmp_path / "00000.tar", [("a.jpg", b"not a jpeg"), ("a.txt", b"a caption"),
                                              ("b.jpg", _jpeg()), ("b.txt", b"")])
    out = tmp_path / "out"
    assert main(["ingest", str(src), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == (
        "kept 0, quarantined 2 {'empty_caption': 1, 'undecodable_image': 1}")
    assert _one_error_line(captured.err, "ingest") == (
        f"kept nothing: all 2 samples were quarantined, see {out / 'quarantine.jsonl'} for the reasons")
    records = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in records] == [("a", "undecodable_image"), ("b", "empty_caption")]


def test_ingest_of_an_empty_annotation_list_exits_1(tmp_path: Path, capsys) -> None:
    ann = tmp_path / "annotations.json"
    ann.write_text("[]")
    assert main(["ingest", str(ann), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert _one_error_line(err, "ingest") == f"kept nothing: {ann} holds no annotated images"


def test_ingest_human_all_images_missing_suggests_the_image_root(tmp_path: Path, capsys) -> None:
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "000000000001.jpg"}],
                               "annotations": [{"id": 5, "image_id": 1, "caption": "a dog"}]}))
    out = tmp_path / "out"
    assert main(["ingest", str(ann), "--out", str(out)]) == 1
    assert _one_error_line(capsys.readouterr().err, "ingest") == (
        f"kept nothing: all 1 images were quarantined, see {out / 'quarantine.jsonl'} for the reasons (image "
        f"files not found: are the paths relative to --image-root, now {tmp_path}?)")


def test_ingest_that_keeps_something_exits_0(tmp_path: Path, capsys) -> None:
    write_shards([Sample("a", _jpeg(), "a green square"), Sample("b", _jpeg(), "")], tmp_path / "web", 4)
    assert main(["ingest", str(tmp_path / "web"), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "kept 1, quarantined 1 {'empty_caption': 1}"
    assert captured.err == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--web-noise", "1.5"], "argument --web-noise: 1.5 is outside [0, 1]"),
        (["--web-noise", "-0.1"], "argument --web-noise: -0.1 is outside [0, 1]"),
        (["--web-noise", "nan"], "argument --web-noise: nan is outside [0, 1]"),
        (["--web-noise", "lots"], "argument --web-noise: 'lots' is not a number"),
        (["--n-web", "-1"], "argument --n-web: -1 is negative"),
        (["--n-human-train", "2.5"], "argument --n-human-train: '2.5' is not an integer"),
        (["--n-human-test", "-4"], "argument --n-human-test: -4 is negative"),
    ],
)
def test_synth_option_out_of_range_is_a_usage_error(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--out", str(tmp_path / "w"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: blip-core synth")
    assert err.splitlines()[-1] == f"blip-core synth: error: {message}"
    assert not (tmp_path / "w").exists()


def test_synth_accepts_the_ends_of_the_ranges(tmp_path: Path, capsys) -> None:
    out = tmp_path / "w"
    argv = ["--web-noise", "1", "--n-web", "0", "--n-human-train", "0", "--n-human-test", "0"]
    assert main(["synth", "--out", str(out), *argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["web"]["pairs"] == 0
    assert manifest["counts"]["human"]["images"] == {"train": 0, "val": 100, "test": 0}


MISSING_INPUTS: list[tuple[list[str], str]] = [
    (["pretrain", "--data", "{d}/web", "--out", "{d}/ck", "--preset", "tiny"],
     "data source '{d}/web' not found"),
    (["finetune", "--task", "captioner", "--init-from", "{d}/ck", "--data", "{d}/web",
      "--out", "{d}/cap"],
     "{d}/ck is not a complete checkpoint (needs config.json and model.safetensors)"),
    (["caption", "--checkpoint", "{d}/ck", "--data", "{d}/web", "--out", "{d}/c.jsonl"],
     "{d}/ck is not a complete checkpoint (needs config.json and model.safetensors)"),
    (["filter", "--checkpoint", "{d}/ck", "--data", "{d}/web", "--out", "{d}/s.jsonl"],
     "{d}/ck is not a complete checkpoint (needs config.json and model.safetensors)"),
    (["eval", "--checkpoint", "{d}/ck", "--data", "{d}/ann.json:test", "--out", "{d}/ev"],
     "{d}/ck is not a complete checkpoint (needs config.json and model.safetensors)"),
    (["capfilt", "--captioner", "{d}/cap", "--filter", "{d}/flt", "--web", "{d}/web", "--human",
      "{d}/ann.json", "--out", "{d}/corpus"], "data source '{d}/web' not found"),
    (["bootstrap", "--out", "{d}/run", "--config", "{d}/run.yaml"],
     "{d}/run.yaml: No such file or directory"),
    (["export-hf", "{d}/ck", "{d}/hf", "--task", "captioner"],
     "{d}/ck is not a complete checkpoint (needs config.json and model.safetensors)"),
    (["import-blip", "{d}/model_base.pth", "{d}/ck"], "{d}/model_base.pth: No such file or directory"),
]
"""(argv with {d} for the test's folder, the error message) of each model command."""


@pytest.mark.parametrize(("argv", "message"), MISSING_INPUTS, ids=[argv[0] for argv, _ in MISSING_INPUTS])
def test_every_command_with_a_missing_input_is_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path)
    assert main([a.format(d=d) for a in argv]) == 2
    assert _one_error_line(capsys.readouterr().err, argv[0]) == message.format(d=d)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_only_bad_input_errors_become_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def usage(argv: list[str]) -> int:
        raise UsageError("first line\n  second line")

    monkeypatch.setattr(cli, "synth_main", usage)
    assert main(["synth"]) == 2
    assert capsys.readouterr().err == "blip-core synth: error: first line second line\n"
    for bug in (ValueError("a bug"), KeyError("a bug"), PermissionError(13, "Permission denied")):
        def raise_bug(argv: list[str], bug: Exception = bug) -> int:
            raise bug

        monkeypatch.setattr(cli, "synth_main", raise_bug)
        with pytest.raises(type(bug)):
            main(["synth"])
