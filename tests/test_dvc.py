"""The DVC resource with the real DVC CLI, and dvc.yaml kept in step with the Dagster graph."""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from dagster import MaterializeResult, asset, materialize

from resources.dvc import DVC_POOL, DvcError, DvcResource, find_dvc

ROOT = Path(__file__).resolve().parents[1]
DVC = find_dvc()
needs_dvc = pytest.mark.skipif(DVC is None, reason="DVC CLI not installed: `make setup` installs it "
                                                   "(uv tool install 'dvc[s3]')")


def _dataset(path: Path, text: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "part-0.txt").write_text(text)
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "part-1.txt").write_text(text[::-1])
    return path


@needs_dvc
def test_version_adds_pushes_and_returns_the_dvc_hash(tmp_path: Path):
    dvc = DvcResource(repo_dir=str(tmp_path / "data"))
    ds = _dataset(tmp_path / "data" / "assets" / "human_pairs", "hello")
    v1 = dvc.version(ds)
    assert re.fullmatch(r"[0-9a-f]{32}\.dir", v1.md5)
    assert v1.nfiles == 2 and v1.path == "assets/human_pairs" and v1.dvc_file == "assets/human_pairs.dvc"
    recorded = yaml.safe_load((tmp_path / "data" / "assets" / "human_pairs.dvc").read_text())
    assert recorded["outs"][0]["md5"] == v1.md5
    remote = tmp_path / "data" / "dvc-remote"
    assert v1.remote == str(remote) and any(remote.rglob(v1.md5[2:]))  # the pushed .dir manifest
    assert v1.metadata()["dvc_md5"] == v1.md5
    (ds / "part-0.txt").write_text("changed")
    assert dvc.version(ds).md5 != v1.md5
    assert not (tmp_path / "data" / ".git").exists()  # --no-scm: the data folder is no git repo


@needs_dvc
@pytest.mark.slow  # several DVC CLI runs
def test_s3_remote_and_s3_sources(tmp_path: Path, s3_env: str):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket="dvc-test")
    dvc = DvcResource(repo_dir=str(tmp_path / "data"), remote_url="s3://dvc-test/dvcstore",
                      endpoint_url=s3_env)
    local = dvc.version(_dataset(tmp_path / "data" / "assets" / "filter", "weights"))
    for key, body in (("blip/assets/web_shards/00000.tar/a.txt", b"a"),
                      ("blip/assets/web_shards/00000.tar/b.txt", b"b")):
        s3.put_object(Bucket="dvc-test", Key=key, Body=body)
    remote = dvc.version("s3://dvc-test/blip/assets/web_shards/00000.tar",
                         name="assets/web_shards/00000.tar")
    assert remote.nfiles == 2 and (tmp_path / "data" / "assets" / "web_shards" / "00000.tar.dvc").is_file()
    stored = {o["Key"] for o in s3.list_objects_v2(Bucket="dvc-test", Prefix="dvcstore/")["Contents"]}
    for v in (local, remote):
        assert f"dvcstore/files/md5/{v.md5[:2]}/{v.md5[2:]}" in stored
    config = (tmp_path / "data" / ".dvc" / "config").read_text()
    assert "testing" not in config  # credentials come from the environment, never the config


@needs_dvc
@pytest.mark.slow  # several DVC CLI runs
def test_concurrent_versioning_is_serialised(tmp_path: Path):
    dvc = DvcResource(repo_dir=str(tmp_path / "data"), push=False)
    dvc.ensure_repo()
    paths = [_dataset(tmp_path / "data" / "assets" / f"a{i}", str(i)) for i in range(3)]
    results, errors = {}, []

    def work(p: Path) -> None:
        try:
            results[p.name] = dvc.version(p).md5
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results.values())) == 3


@needs_dvc
def test_asset_records_the_hash_in_its_metadata(tmp_path: Path):
    @asset(pool=DVC_POOL)
    def bootstrapped_corpus(dvc: DvcResource) -> MaterializeResult:
        out = _dataset(tmp_path / "data" / "assets" / "bootstrapped_corpus", "corpus")
        return MaterializeResult(metadata=dvc.version(out).metadata())

    dvc = DvcResource(repo_dir=str(tmp_path / "data"), push=False)
    result = materialize([bootstrapped_corpus], resources={"dvc": dvc})
    meta = result.asset_materializations_for_node("bootstrapped_corpus")[0].metadata
    assert meta["dvc_md5"].value.endswith(".dir")
    assert meta["dvc_file"].value == "assets/bootstrapped_corpus.dvc"


def test_missing_dvc_cli_fails_clearly(tmp_path: Path):
    dvc = DvcResource(repo_dir=str(tmp_path), dvc_bin=str(tmp_path / "no-dvc"))
    with pytest.raises(DvcError, match="DVC CLI not found"):
        dvc.ensure_repo()


@needs_dvc
def test_outside_paths_need_a_safe_name(tmp_path: Path):
    dvc = DvcResource(repo_dir=str(tmp_path / "data"))
    with pytest.raises(ValueError, match="relative path"):
        dvc.version(_dataset(tmp_path / "elsewhere", "x"), name="../escape")


# --- dvc.yaml -----------------------------------------------------------------------------


def _stages() -> dict[str, dict]:
    """dvc.yaml with params.yaml interpolated (``${a.b}``), as DVC does."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())

    def value(match: re.Match) -> str:
        node = params
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    text = re.sub(r"\$\{([\w.]+)\}", value, (ROOT / "dvc.yaml").read_text())
    return yaml.safe_load(text)["stages"]


def _outs(stage: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]


def dvc_lineage() -> dict[str, set[str]]:
    """Stage -> the stages whose outputs it reads (a dep inside another stage's output counts)."""
    stages = _stages()
    owner = {out: name for name, s in stages.items() for out in _outs(s)}
    graph: dict[str, set[str]] = {}
    for name, stage in stages.items():
        ups = set()
        for dep in stage.get("deps", []):
            for out, producer in owner.items():
                if dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep + "/"):
                    ups.add(producer)
        graph[name] = ups
    return graph


def test_dvc_stages_are_the_dagster_assets_with_the_same_lineage():
    try:
        from orchestration.definitions import defs
    except ImportError as e:  # pragma: no cover - a clear failure rather than a skip
        pytest.fail(f"orchestration.definitions.defs does not load: {e}")
    graph = defs().resolve_asset_graph()
    dagster = {k.to_user_string(): {u.to_user_string() for u in graph.get(k).parent_keys}
               for k in graph.materializable_asset_keys}
    dvc = dvc_lineage()
    sources = {"synth"}  # the landing area: shards arrive from outside the Dagster graph
    registry_only = {"registered_model"}  # the promotion asset acts on MLflow, not on files
    assert set(dvc) - sources == set(dagster) - registry_only
    for stage, ups in dvc.items():
        if stage in sources:
            continue
        assert ups - sources == dagster[stage], f"{stage}: dvc reads {ups}, dagster {dagster[stage]}"


def test_real_dvc_accepts_the_pipeline(tmp_path: Path):
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run([DVC, "stage", "list"], cwd=tmp_path, check=True, capture_output=True,
                            text=True).stdout
    assert [line.split()[0] for line in listed.splitlines() if line.strip()] == list(_stages())
    dag = subprocess.run([DVC, "dag", "--dot"], cwd=tmp_path, check=True, capture_output=True,
                         text=True).stdout
    assert '"pretrained_med" -> "captioner"' in dag


def test_every_stage_command_uses_real_blip_core_options(capsys: pytest.CaptureFixture[str]):
    """Each ``--flag`` in dvc.yaml is an option of ``blip-core COMMAND`` (read from its --help)."""
    from blip_core.cli import main

    helps: dict[str, set[str]] = {}
    for name, stage in _stages().items():
        argv = shlex.split(stage["cmd"])
        assert argv[0] == "blip-core", name
        command = argv[1]
        if command not in helps:
            with contextlib.suppress(SystemExit):  # argparse exits after --help; some return
                main([command, "--help"])
            helps[command] = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", capsys.readouterr().out))
        missing = [a for a in argv[2:] if a.startswith("--") and a not in helps[command]]
        assert not missing, f"stage {name}: blip-core {command} has no {missing}"
