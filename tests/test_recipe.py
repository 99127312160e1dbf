"""One recipe: every entry point builds the same default recipe (blip_core.recipe.Recipe).

The entry points are the ``blip-core`` training and captioning commands, ``blip-core bootstrap``,
the Dagster assets (``make run``) and ``params.yaml`` (``dvc repro``, its commands rendered by
the real DVC CLI). Each is asked for its default and compared with the recipe's.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from blip_core.config import TrainConfig, from_dict
from blip_core.recipe import Recipe, load_recipe, stage_config

ROOT = Path(__file__).resolve().parents[1]
DVC = shutil.which("dvc") or str(Path.home() / ".local/bin/dvc")
TASKS = ("pretrain", "captioner", "filter")


def _cli_config(task: str, *argv: str) -> TrainConfig:
    from blip_core.train import build_parser, config_from_args

    cli_task = None if task == "pretrain" else task
    args = build_parser(cli_task).parse_args(list(argv))
    return config_from_args(args, task)


def _recipe_stage(recipe: Recipe, task: str, data: tuple[str, ...], out: str,
                  init_from: str | None = None) -> TrainConfig:
    return stage_config(recipe, recipe.stage(task), task, data, out, init_from)


@pytest.mark.parametrize("task", TASKS)
def test_the_training_commands_train_the_recipes_stage_by_default(task):
    init = () if task == "pretrain" else ("--init-from", "ck")
    got = _cli_config(task, "--data", "web", "--out", "o", *init)
    want = _recipe_stage(Recipe(), task, ("web",), "o", "ck" if init else None)
    assert got == replace(want, resume=False)  # the command resumes only when asked (--resume)
    assert got.max_steps == Recipe().stage(task).max_steps and got.precision == "auto"


def test_flags_and_overrides_change_only_what_they_name():
    got = _cli_config("pretrain", "--data", "web", "--out", "o", "--lr", "0.01", "warmup_steps=3")
    assert got == replace(_recipe_stage(Recipe(), "pretrain", ("web",), "o"), lr=0.01, warmup_steps=3,
                          resume=False)
    epochs = _cli_config("pretrain", "--data", "web", "--out", "o", "--epochs", "2")
    assert (epochs.epochs, epochs.max_steps) == (2, None)  # --epochs alone is not capped by the recipe


def test_the_captioning_and_capfilt_commands_default_to_the_recipe():
    from blip_core.evaluate import build_parser as eval_parser
    from blip_core.generate import build_parser as caption_parser

    capfilt = Recipe().capfilt_config()
    args = caption_parser().parse_args(["--checkpoint", "c", "--data", "d", "--out", "o"])
    assert (args.method, args.top_p, args.num_beams, args.max_length, args.min_length, args.batch_size,
            args.seed) == (capfilt.method, capfilt.top_p, capfilt.num_beams, capfilt.max_length,
                           capfilt.min_length, capfilt.batch_size, capfilt.seed)
    args = eval_parser().parse_args(["--checkpoint", "c", "--data", "d:test", "--out", "o"])
    assert (args.k, args.caption_method) == (Recipe().eval.k, Recipe().eval.caption_method)


def test_bootstrap_runs_the_recipe_and_a_yaml_preset_survives_the_command_line(tmp_path):
    from blip_core.bootstrap import parse_args

    assert parse_args(["--out", "o"])[1] == Recipe()
    (tmp_path / "r.yaml").write_text("preset: base\npretrain: {max_steps: 7}\n")
    _, recipe = parse_args(["--out", "o", "--config", str(tmp_path / "r.yaml")])
    assert (recipe.preset, recipe.pretrain.max_steps, recipe.pretrain.lr) == ("base", 7, Recipe().pretrain.lr)
    _, recipe = parse_args(["--out", "o", "--config", str(tmp_path / "r.yaml"), "--preset", "large"])
    assert recipe.preset == "large"


def test_the_assets_default_to_the_recipe_and_run_a_recipe_they_are_given():
    from assets.recipe import recipe_run_config, recipe_settings

    settings = recipe_settings(Recipe())
    for name, value in settings.items():
        assert value == type(value)(), f"{name}: the asset's defaults differ from the recipe"
    for name, task in (("pretrained_med", "pretrain"), ("captioner", "captioner"), ("filter", "filter")):
        s = settings[name]
        want = _recipe_stage(Recipe(), task, ("d",), "o")
        assert stage_config(s.recipe(), s.stage(), task, ("d",), "o") == want
    assert settings["synthetic_captions"].to_capfilt() == Recipe().capfilt_config()
    assert settings["bootstrapped_corpus"].to_capfilt() == Recipe().capfilt_config()

    quick = recipe_run_config(load_recipe(ROOT / "recipes" / "quick.yaml"))["ops"]
    assert quick["pretrained_med"]["config"]["max_steps"] == 180
    assert quick["bootstrapped_med"]["config"]["max_steps"] == 180  # both pre-trainings: one stage
    assert quick["pretrained_med"]["config"]["lr"] == Recipe().pretrain.lr
    with pytest.raises(ValueError, match="one bootstrap round"):
        recipe_settings(Recipe(rounds=2))


def test_the_main_command_lays_a_dagster_run_config_over_the_recipe(tmp_path):
    from orchestration.main import lineage_run_config

    (tmp_path / "run.yaml").write_text("ops: {captioner: {config: {lr: 0.002}}}\n")
    ops = lineage_run_config(load_recipe(None, ["captioner.max_steps=11"]), tmp_path / "run.yaml")["ops"]
    assert (ops["captioner"]["config"]["max_steps"], ops["captioner"]["config"]["lr"]) == (11, 0.002)
    assert ops["filter"]["config"]["max_steps"] == Recipe().filter.max_steps


def test_params_yaml_is_the_recipe():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.pop("root")
    assert from_dict(Recipe, params) == Recipe()


def _rendered_commands(tmp_path: Path) -> dict[str, list[str]]:
    """Each stage's command as ``dvc repro --dry`` renders it from params.yaml."""
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    dry = subprocess.run([DVC, "repro", "--dry", "--force"], cwd=tmp_path, check=True, capture_output=True,
                         text=True).stdout
    out, stage = {}, None
    for line in dry.splitlines():
        if line.startswith("Running stage '"):
            stage = line.split("'")[1]
        elif line.startswith("> ") and stage:
            out[stage] = shlex.split(line[2:])
    return out


@pytest.mark.skipif(not Path(DVC).exists(), reason="the DVC CLI is installed by `make setup`")
def test_dvc_repro_trains_and_evaluates_with_the_recipe(tmp_path):
    """The commands DVC runs, parsed by the commands themselves, are the recipe's stages."""
    from blip_core.evaluate import build_parser as eval_parser

    commands = _rendered_commands(tmp_path)
    root = "runs/dvc"
    for stage, task in (("pretrained_med", "pretrain"), ("captioner", "captioner"), ("filter", "filter"),
                        ("bootstrapped_med", "pretrain")):
        argv = commands[stage]
        assert argv[:2] == ["blip-core", "pretrain" if task == "pretrain" else "finetune"]
        args = [a for a in argv[2:] if a not in ("--task", task) or task == "pretrain"]
        got = _cli_config(task, *args)
        want = _recipe_stage(Recipe(), task, got.data, f"{root}/{stage}", got.init_from)
        assert replace(got, progress=True) == replace(want, resume=False), stage
    ev = eval_parser().parse_args(commands["downstream_evals"][2:])
    assert (ev.k, ev.caption_method, ev.data.rsplit(":", 1)[1]) == (
        Recipe().eval.k, Recipe().eval.caption_method, Recipe().eval.split)


def test_precision_auto_is_what_the_hardware_runs_natively():
    from blip_core.device import cpu_has_native_bf16, resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16-lm" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    if torch.cuda.is_available():
        assert resolve_precision("auto", "cuda") == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", "cpu")
