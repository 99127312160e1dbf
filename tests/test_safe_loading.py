"""Nothing we read runs code: crafted checkpoints, configs and trainer states are refused.

Every loader that takes a user's file is fed a pickle whose unpickling would create a marker file
(``__reduce__`` -> ``os.system``), malformed safetensors, weights of the wrong dtype and YAML /
JSON configs carrying ``!!python/object`` tags. Each is refused with an error naming the file and
the marker never appears. Our own checkpoint folders hold no pickle at all.
"""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from blip_core.checkpoint import (
    OPTIMIZER_FILE,
    WEIGHTS_FILE,
    latest_trainer_state,
    load_for_inference,
    load_model,
    load_trainer_state,
    save_checkpoint,
    save_trainer_state,
)
from blip_core.config import TrainConfig, model_preset
from blip_core.interop import import_main, to_official
from blip_core.model import BlipModel
from blip_core.tokenizer import load_tokenizer
from blip_core.train import main as train_main
from blip_core.train import setup_optimizer, train

ROOT = Path(__file__).resolve().parents[1]


class _Exploit:
    """Unpickling this object would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def model() -> BlipModel:
    torch.manual_seed(0)
    return BlipModel(model_preset("tiny"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Training in this process: one thread runs far faster on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _evil_pickle(path: Path, marker: Path, payload: object | None = None) -> Path:
    torch.save(payload if payload is not None else {"model": {"trap": _Exploit(marker)}}, path)
    return path


def _safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


MALFORMED: dict[str, bytes] = {
    "header-longer-than-file": _safetensors_bytes(b"{}", length=10**6),
    "header-of-2**63-bytes": _safetensors_bytes(b"{}", length=2**63),
    "header-not-json": _safetensors_bytes(b"not json at all!"),
    "unknown-dtype": _safetensors_bytes({"w": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}},
                                        b"\0" * 4),
    "offsets-past-the-end": _safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4),
    "empty-file": b"",
}


# --- the code itself ------------------------------------------------------------------------

# Calls that unpickle, run code or build arbitrary objects from a file's content.
_FORBIDDEN = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads",
    "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
    "marshal.load", "marshal.loads", "shelve.open", "yaml.load", "yaml.load_all", "yaml.full_load",
    "yaml.unsafe_load", "yaml.unsafe_load_all", "pd.read_pickle", "pandas.read_pickle",
    "torch.jit.load", "mlflow.pytorch.load_model", "eval", "exec", "compile",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def test_no_loader_in_the_code_unpickles_or_evaluates_file_content():
    """Every ``torch.load`` has ``weights_only=True``; no pickle / unsafe YAML / eval anywhere."""
    offences, torch_loads, files = [], 0, 0
    for folder in ("blip_core", "orchestration", "assets", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            files += 1
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                name, where = _dotted(node.func), f"{path.relative_to(ROOT)}:{node.lineno}"
                if name == "torch.load":
                    torch_loads += 1
                    if not _keyword_is_true(node, "weights_only"):
                        offences.append(f"{where} torch.load without weights_only=True")
                elif name in _FORBIDDEN:
                    offences.append(f"{where} {name}")
                elif name in ("np.load", "numpy.load") and _keyword_is_true(node, "allow_pickle"):
                    offences.append(f"{where} {name}(allow_pickle=True)")
    assert offences == []
    assert files > 30 and torch_loads >= 2  # the scan did reach the loaders it vets


# --- our own files --------------------------------------------------------------------------


def _not_plain_data(folder: Path) -> list[str]:
    """Files under ``folder`` that are not a valid safetensors file, JSON, or a text vocabulary."""
    odd = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    f.keys()
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.name != "vocab.txt":
                raise ValueError("unexpected kind of file")
        except Exception as err:  # noqa: BLE001 - any failure to parse counts
            odd.append(f"{path.relative_to(folder)} ({err})")
    return odd


def test_a_training_run_writes_no_pickle_and_its_state_round_trips(tiny_world, tmp_path, one_thread):
    out = tmp_path / "run"
    train(TrainConfig(data=(str(tiny_world / "web"),), out=str(out), max_steps=2, batch_size=8,
                      warmup_steps=1, save_every=1, progress=False))
    assert _not_plain_data(out) == []  # no pickle, no torch.save zip
    state = latest_trainer_state(out)
    assert sorted(p.name for p in state.iterdir()) == sorted([WEIGHTS_FILE, OPTIMIZER_FILE, "state.json"])
    with safe_open(str(state / OPTIMIZER_FILE), "pt") as f:
        assert "state" in f.metadata() and len(f.keys()) > 100  # Adam moments + RNG, as tensors

    # The optimizer state comes back with the same keys (integers), tuples and exact tensors.
    torch.manual_seed(1)
    model = BlipModel(model_preset("tiny"))
    optimizer, scheduler = setup_optimizer(model, TrainConfig(warmup_steps=1), 4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": {"torch": torch.get_rng_state()}}
    folder = save_trainer_state(tmp_path / "rt", 1, model, saved, {"step": 1})
    loaded, progress = load_trainer_state(folder, BlipModel(model_preset("tiny")))
    assert progress == {"step": 1}
    assert loaded["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    assert isinstance(loaded["optimizer"]["param_groups"][0]["betas"], tuple)
    assert loaded["scheduler"] == saved["scheduler"]
    assert torch.equal(loaded["rng"]["torch"], saved["rng"]["torch"])
    assert loaded["optimizer"]["state"].keys() == saved["optimizer"]["state"].keys()
    for i, s in saved["optimizer"]["state"].items():
        assert all(torch.equal(loaded["optimizer"]["state"][i][k], v) for k, v in s.items())


# --- official checkpoints (blip-core import-blip) -------------------------------------------


def test_import_blip_cli_refuses_a_malicious_official_checkpoint(model, tmp_path):
    """A real ``blip-core import-blip`` process, the trap inside the official layout."""
    marker = tmp_path / "pwned"
    pth = _evil_pickle(tmp_path / "model_base.pth", marker,
                       {"model": {**to_official(model), "trap": _Exploit(marker)}, "epoch": 19})
    proc = subprocess.run([sys.executable, "-m", "blip_core.cli", "import-blip", str(pth),
                           str(tmp_path / "ck")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"refusing {pth}: not a plain tensor checkpoint (UnpicklingError" in proc.stderr
    assert not marker.exists() and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_import_blip_refuses_malformed_safetensors(name, tmp_path):
    path = tmp_path / "model_base.safetensors"
    path.write_bytes(MALFORMED[name])
    with pytest.raises(ValueError, match=f"refusing {path}: not a valid safetensors file"):
        import_main([str(path), str(tmp_path / "ck")])
    assert not (tmp_path / "ck").exists()


def test_import_blip_refuses_a_pickle_named_safetensors_and_weights_of_the_wrong_dtype(model, tmp_path):
    marker = tmp_path / "pwned"
    disguised = _evil_pickle(tmp_path / "model_base.safetensors", marker)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        import_main([str(disguised), str(tmp_path / "ck")])
    assert not marker.exists()

    # A well-formed file whose float weights are stored as integers is not silently cast.
    official = {k: (v.to(torch.int32) if v.is_floating_point() else v).contiguous()
                for k, v in to_official(model).items()}
    save_file(official, str(tmp_path / "ints.safetensors"))
    with pytest.raises(ValueError, match="dtype torch.int32 does not fit torch.float32"):
        import_main([str(tmp_path / "ints.safetensors"), str(tmp_path / "ck"),
                     "--vision-heads", "4", "--text-heads", "4"])
    assert not (tmp_path / "ck").exists()


# --- our checkpoint folders (eval, caption, filter, capfilt, finetune --init-from, pyfunc) -----


@pytest.fixture
def checkpoint(model, tmp_path) -> Path:
    return save_checkpoint(tmp_path / "ck", model, load_tokenizer(), {"task": "pretrain"})


def _tamper(checkpoint: Path, marker: Path) -> dict[str, tuple[Callable[[], None], str]]:
    """Ways to corrupt a checkpoint folder, each with the error it must raise."""
    weights, config = checkpoint / WEIGHTS_FILE, checkpoint / "config.json"
    good = json.loads(config.read_text())

    def ints() -> None:
        with safe_open(str(weights), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        save_file({k: v.to(torch.int64) if v.is_floating_point() else v for k, v in state.items()},
                  str(weights))

    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    return {
        "pickle-as-weights": (lambda: _evil_pickle(weights, marker), "not a valid safetensors file"),
        "header-longer-than-file": (lambda: weights.write_bytes(MALFORMED["header-longer-than-file"]),
                                    "not a valid safetensors file"),
        "integer-weights": (ints, "dtype torch.int64 does not fit torch.float32"),
        "yaml-tag-as-config": (lambda: config.write_text(f"model: {tag}\n"),
                               "config.json: not a model config"),
        "yaml-tag-in-json": (lambda: config.write_text(json.dumps({**good, "model": {
            **good["model"], "vision": tag}})), "config.json: not a model config"),
        "string-for-a-number": (lambda: config.write_text(json.dumps({**good, "model": {
            **good["model"], "embed_dim": "64; touch x"}})), "BlipConfig.embed_dim is not of type int"),
    }


CORRUPTIONS = ["pickle-as-weights", "header-longer-than-file", "integer-weights",
               "yaml-tag-as-config", "yaml-tag-in-json", "string-for-a-number"]


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_loading_a_tampered_checkpoint_folder_is_refused(corruption, checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    corrupt, message = _tamper(checkpoint, marker)[corruption]
    corrupt()
    with pytest.raises(ValueError, match=message):
        load_model(checkpoint)
    with pytest.raises(ValueError, match=message):
        load_for_inference(checkpoint)
    assert not marker.exists()


def test_finetune_init_from_a_tampered_checkpoint_is_refused(checkpoint, tiny_world, tmp_path):
    marker = tmp_path / "pwned"
    _evil_pickle(checkpoint / WEIGHTS_FILE, marker)
    with pytest.raises(ValueError, match=f"refusing {checkpoint / WEIGHTS_FILE}"):
        train_main(["--init-from", str(checkpoint), "--data", str(tiny_world / "web"),
                    "--out", str(tmp_path / "ft"), "--no-progress"], task="captioner")
    assert not marker.exists()


def test_a_tokenizer_folder_cannot_bring_its_own_code(checkpoint, tmp_path):
    """``auto_map`` / ``tokenizer_class`` pointing at a module beside it: never imported."""
    marker = tmp_path / "pwned"
    folder = checkpoint / "tokenizer"
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import BertTokenizer as EvilTokenizer\n")
    _, tokenizer = load_for_inference(checkpoint)
    assert type(tokenizer).__name__ == "BertTokenizer" and len(tokenizer) == 30524
    assert not marker.exists()


# --- trainer states (--resume) and training configs (--config) ------------------------------


def test_resume_refuses_a_malicious_optimizer_pickle(model, tiny_world, tmp_path):
    """A trainer state in the older layout (``optimizer.pt``) is read with ``weights_only=True``."""
    marker, out = tmp_path / "pwned", tmp_path / "run"
    folder = save_trainer_state(out, 4, model, {"optimizer": {}}, {"step": 4})
    (folder / OPTIMIZER_FILE).unlink()
    _evil_pickle(folder / "optimizer.pt", marker, {"optimizer": _Exploit(marker)})
    assert latest_trainer_state(out) == folder  # a complete state of the older layout ...
    with pytest.raises(ValueError, match=f"refusing {folder / 'optimizer.pt'}: not a plain tensor file"):
        train(TrainConfig(data=(str(tiny_world / "web"),), out=str(out), max_steps=6, batch_size=8,
                          progress=False, resume=True))  # ... refused, not run
    assert not marker.exists()


def test_resume_refuses_a_trainer_state_with_a_crafted_structure(model, tmp_path):
    folder = save_trainer_state(tmp_path / "run", 2, model, {"optimizer": {}}, {"step": 2})
    save_file({}, str(folder / OPTIMIZER_FILE), metadata={"state": json.dumps({"tensor": "404"})})
    with pytest.raises(ValueError, match=f"refusing {folder / OPTIMIZER_FILE}: not a trainer state"):
        load_trainer_state(folder, model)
    save_file({}, str(folder / OPTIMIZER_FILE))  # no structure at all
    with pytest.raises(ValueError, match="not a trainer state"):
        load_trainer_state(folder, model)


def test_a_training_config_with_a_python_tag_is_refused(tiny_world, tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f'max_steps: 1\nseed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor for the tag "
                                        "'tag:yaml.org,2002:python/object/apply:os.system'"):
        train_main(["--config", str(config), "--data", str(tiny_world / "web"),
                    "--out", str(tmp_path / "run"), "--no-progress"], task="pretrain")
    assert not marker.exists() and not (tmp_path / "run").exists()
