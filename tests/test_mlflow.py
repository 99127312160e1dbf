"""The MLflow resource and pyfunc models, on real SQLite tracking stores."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port
from dagster import Failure, asset, materialize

from blip_core.config import TrainConfig
from resources.mlflow_run import flatten, metric_key
from resources.mlflow_store import MlflowUnavailableError
from resources.mlflow_tracking import MlflowResource
from resources.redaction import redact_uri


def tiny_checkpoint(out: Path) -> Path:
    """An untrained tiny-preset checkpoint folder (seeded; no training needed)."""
    import torch

    from blip_core.checkpoint import save_checkpoint
    from blip_core.config import model_preset
    from blip_core.model import BlipModel
    from blip_core.tokenizer import load_tokenizer

    torch.manual_seed(0)
    save_checkpoint(out, BlipModel(model_preset("tiny")), load_tokenizer(), meta={"task": "pretrain"})
    (out / "trainer_state").mkdir()
    (out / "trainer_state" / "optimizer.pt").write_bytes(b"not for serving")
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty SQLite tracking store (creating one costs seconds; copying it does not)."""
    data = tmp_path_factory.mktemp("template")
    MlflowResource(data_dir=str(data), tracking_uri=f"sqlite:///{data}/mlflow.db").client().search_experiments()
    return data / "mlflow.db"


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> MlflowResource:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "data" / "mlflow").mkdir(parents=True)
    shutil.copy(empty_store, tmp_path / "data" / "mlflow" / "mlflow.db")
    return MlflowResource(data_dir=str(tmp_path / "data"))


def _image_bytes(seed: int) -> bytes:
    import numpy as np

    from blip_core.data.shapes import render, sample_scene

    buf = io.BytesIO()
    render(sample_scene(np.random.default_rng(seed))).save(buf, format="PNG")
    return buf.getvalue()


def test_embedded_default_is_a_sqlite_store_in_the_data_folder(tracking: MlflowResource, tmp_path: Path):
    assert tracking.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'data' / 'mlflow' / 'mlflow.db'}"
    tracking.connect()
    assert (tmp_path / "data" / "mlflow" / "mlflow.db").is_file()
    exp = tracking.client().get_experiment_by_name("blip-ops")
    assert exp.artifact_location == (tmp_path / "data" / "mlflow" / "artifacts").as_uri()


def test_env_tracking_uri_overrides_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert MlflowResource(data_dir=str(tmp_path)).resolved_tracking_uri() == f"sqlite:///{tmp_path}/other.db"


def test_connecting_one_store_does_not_redirect_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a later default resource must not inherit it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    MlflowResource(tracking_uri=f"sqlite:///{tmp_path}/first.db").connect()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = MlflowResource(data_dir=str(tmp_path / "second"))
    assert second.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'second' / 'mlflow' / 'mlflow.db'}"


def test_assets_get_nested_runs_with_params_step_metrics_config_and_datasets(
        tracking: MlflowResource, tmp_path: Path):
    cfg = TrainConfig(data=("web", "human.json:train"), out="ckpt", max_steps=3, lr=1e-4)

    @asset
    def captioner(context, mlflow: MlflowResource) -> None:
        with mlflow.start_run(context) as run:
            run.log_config(cfg)
            for step in (1, 2, 3):
                run.log_step(step, {"step": step, "lm": 4.0 - step, "lr": 1e-4})
            run.log_dataset("human_pairs", tmp_path, digest="0" * 32 + ".dir", tags={"split": "train"})

    @asset(deps=[captioner])
    def filter(context, mlflow: MlflowResource) -> None:
        with mlflow.start_run(context) as run:
            run.log_params({"task": "filter"})

    result = materialize([captioner, filter], resources={"mlflow": tracking})
    client = tracking.client()
    runs = client.search_runs([tracking.connect()], f"tags.dagster_run_id = '{result.run_id}'")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"captioner", "filter", f"dagster-{result.run_id[:8]}"}
    parent = by_name[f"dagster-{result.run_id[:8]}"]
    assert parent.info.status == "FINISHED"
    for name in ("captioner", "filter"):
        run = by_name[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["dagster_asset"] == name
    run = by_name["captioner"]
    assert run.data.params["lr"] == "0.0001" and run.data.params["data"] == "web,human.json:train"
    history = client.get_metric_history(run.info.run_id, "lm")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    config = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json",
                                                       str(tmp_path))).read_text())
    assert config["max_steps"] == 3
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "human_pairs"
    assert dataset_input.dataset.digest == "0" * 32 + ".dir"
    tags = {t.key: t.value for t in dataset_input.tags}
    assert tags["mlflow.data.context"] == "training" and tags["split"] == "train"


def test_a_failing_asset_ends_its_run_failed_and_the_parent_too(tracking: MlflowResource):
    @asset
    def pretrained_med(context, mlflow: MlflowResource) -> None:
        with mlflow.start_run(context) as run:
            run.log_metrics({"itc": 1.0}, step=1)
            raise Failure("out of memory")

    result = materialize([pretrained_med], resources={"mlflow": tracking}, raise_on_error=False)
    assert not result.success
    runs = tracking.client().search_runs([tracking.connect()], f"tags.dagster_run_id = '{result.run_id}'")
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {"pretrained_med": "FAILED", f"dagster-{result.run_id[:8]}": "FAILED"}
    child = next(r for r in runs if r.info.run_name == "pretrained_med")
    assert "out of memory" in child.data.tags["error"]


def test_steps_that_connect_at_once_to_a_fresh_store_share_one_experiment(tracking: MlflowResource):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    for round_ in range(3):  # each round a new experiment, created by whichever step gets there first
        steps = [tracking.model_copy(update={"experiment": f"race-{round_}"}) for _ in range(6)]
        start = threading.Barrier(len(steps))

        def connect(step: MlflowResource, start: threading.Barrier = start) -> str:
            start.wait()
            return step.connect()

        with ThreadPoolExecutor(len(steps)) as pool:
            ids = set(pool.map(connect, steps))
        assert len(ids) == 1
        assert [e.experiment_id for e in tracking.client().search_experiments()
                if e.name == f"race-{round_}"] == list(ids)


def test_parent_run_is_created_once_even_when_steps_race(tracking: MlflowResource):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        ids = set(pool.map(lambda _: tracking.parent_run_id("run-abc"), range(4)))
    assert len(ids) == 1
    live = tracking.client().search_runs([tracking.connect()], "tags.dagster_run_id = 'run-abc'")
    assert [r.info.run_id for r in live] == list(ids)


def test_credentials_are_never_logged(tracking: MlflowResource, tmp_path: Path):
    secret = "s3cr3t-value"
    params = {"aws_secret_access_key": secret, "db": f"postgresql://blip:{secret}@db:5432/mlflow",
              "storage": {"api_token": secret, "bucket": "b"}}
    assert secret not in json.dumps(flatten(params))

    @asset
    def captioner(context, mlflow: MlflowResource) -> None:
        with mlflow.start_run(context) as run:
            run.log_config(params)

    result = materialize([captioner], resources={"mlflow": tracking})
    run = tracking.client().search_runs([tracking.connect()], f"tags.dagster_run_id = '{result.run_id}' "
                                        "and tags.dagster_asset = 'captioner'")[0]
    assert secret not in json.dumps(run.data.params)
    assert run.data.params["storage.bucket"] == "b"
    config = tracking.client().download_artifacts(run.info.run_id, "config.json", str(tmp_path))
    assert secret not in Path(config).read_text()
    assert redact_uri("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


def test_unreachable_store_fails_the_step_before_training():
    store = MlflowResource(tracking_uri=f"http://127.0.0.1:{free_port()}", connect_timeout_s=2)
    trained = []

    @asset
    def pretrained_med(mlflow: MlflowResource) -> None:
        trained.append(True)

    with pytest.raises(MlflowUnavailableError, match="not usable"):
        store.connect()
    result = materialize([pretrained_med], resources={"mlflow": store}, raise_on_error=False)
    assert not result.success and not trained
    assert any("MLflow tracking store" in str(e.event_specific_data) for e in result.all_events)


def test_metric_keys_are_mlflow_safe():
    assert metric_key("tr@1") == "tr_at_1"
    assert metric_key("a b/c:d") == "a b/c:d"


@pytest.mark.slow  # three models logged, then loaded and run in a fresh interpreter
def test_models_are_registered_pyfuncs_that_load_and_predict_without_the_repo(
        tracking: MlflowResource, checkpoint: Path, tmp_path: Path):
    @asset
    def models(context, mlflow: MlflowResource) -> None:
        with mlflow.start_run(context) as run:
            run.log_model(checkpoint, task="captioner", registered_model_name="blip-captioner")
            run.log_model(checkpoint, task="filter", registered_model_name="blip-filter", name="filter")
            run.log_model(checkpoint, task="med", registered_model_name="blip-med", name="med")

    materialize([models], resources={"mlflow": tracking})
    client = tracking.client()
    for name in ("blip-captioner", "blip-filter", "blip-med"):
        assert client.get_model_version(name, "1").status == "READY"

    import mlflow

    model_dir = Path(mlflow.artifacts.download_artifacts("models:/blip-captioner/1",
                                                         dst_path=str(tmp_path / "model")))
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert "artifacts/checkpoint/model.safetensors" in files
    assert not any("trainer_state" in f or f.endswith((".pt", ".pth", ".pkl", ".pyc")) for f in files)
    assert not any(f.startswith(("code/orchestration", "code/resources", "code/assets"))
                   or f.endswith(("uv.lock", "pyproject.toml")) for f in files)

    images = [_image_bytes(1), _image_bytes(2)]
    (tmp_path / "images.json").write_text(json.dumps([i.hex() for i in images]))
    # A fresh interpreter that cannot import this repo's packages (blip_core aside) nor Dagster.
    script = textwrap.dedent(f"""
        import json, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("orchestration", "assets", "resources", "dagster", "dagster_pipes"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({tracking.resolved_tracking_uri()!r})
        images = [bytes.fromhex(h) for h in json.load(open({str(tmp_path / 'images.json')!r}))]
        out = {{}}
        cap = mlflow.pyfunc.load_model("models:/blip-captioner/1")
        out["inputs"] = cap.metadata.get_input_schema().input_names()
        out["captions"] = cap.predict(pd.DataFrame({{"image": images}}),
                                      params={{"max_length": 6, "min_length": 1}})["caption"].tolist()
        pairs = pd.DataFrame({{"image": images, "text": ["a red circle", "a blue square"]}})
        out["filter"] = mlflow.pyfunc.load_model("models:/blip-filter/1").predict(pairs).to_dict("list")
        out["med"] = mlflow.pyfunc.load_model("models:/blip-med/1").predict(pairs).to_dict("list")
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["inputs"] == ["image"]
    assert set(out["med"]) == {"match_probability", "similarity"}

    # The known answer: what blip_core gives for the same checkpoint, images and texts in this
    # process (beam search with the signature's defaults; the model's own image transform).
    import torch
    from PIL import Image

    from blip_core.checkpoint import load_model
    from blip_core.data.dataset import image_transform
    from blip_core.filtering import itm_probabilities
    from blip_core.generate import generate_captions
    from blip_core.tokenizer import load_tokenizer, pre_caption

    model, tok = load_model(checkpoint).eval(), load_tokenizer(checkpoint / "tokenizer")
    transform = image_transform(model.cfg.vision.image_size)
    pixels = torch.stack([transform(Image.open(io.BytesIO(i)).convert("RGB")) for i in images])
    texts = ["a red circle", "a blue square"]
    captions = generate_captions(model, tok, pixels, method="beam", max_length=6, min_length=1,
                                 num_beams=3, generator=torch.Generator().manual_seed(0))
    assert out["captions"] == [c[0] for c in captions]
    probs = [float(p[0]) for p in itm_probabilities(model, tok, pixels, [[t] for t in texts])]
    assert out["filter"]["match_probability"] == pytest.approx(probs, abs=1e-5)
    assert out["med"]["match_probability"] == pytest.approx(probs, abs=1e-5)
    ids = tok([pre_caption(t) for t in texts], padding="longest", return_tensors="pt")
    with torch.no_grad():
        sims = (model.image_features(model.encode_image(pixels))
                * model.text_features(ids.input_ids, ids.attention_mask)).sum(-1).tolist()
    assert out["med"]["similarity"] == pytest.approx(sims, abs=1e-5)


@pytest.mark.slow
def test_team_server_script_serves_runs_and_proxies_artefacts(tmp_path: Path):
    """mlflow/start_server.sh: SQLite backend + proxied local artefact store, telemetry off."""
    import os
    import subprocess as sp
    import time

    import requests
    from conftest import stop_process

    port = free_port()
    env = {**os.environ, "BLIP_OPS_DATA": str(tmp_path), "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW_SERVER_ENV": str(tmp_path / "absent.env"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "wb")
    proc = sp.Popen([str(Path(__file__).parents[1] / "mlflow" / "start_server.sh")], env=env,
                    stdout=log, stderr=sp.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(1)
        server = MlflowResource(tracking_uri=f"http://127.0.0.1:{port}")
        client = server.client()
        run = client.create_run(server.connect())
        client.log_dict(run.info.run_id, {"lr": 1e-4}, "config.json")
        assert list((tmp_path / "mlflow" / "artifacts").rglob("config.json"))  # proxied to the store
        assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    finally:
        stop_process(proc, timeout=10)
        log.close()
