"""The packages depend one way: ``blip_core <- resources <- assets <- orchestration``.

Every import statement of every module counts, also one inside a function or under
``TYPE_CHECKING``, and ``importlib.import_module`` / ``__import__`` of a constant name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("blip_core", "resources", "assets", "orchestration")
"""Lowest first: a package may import itself and the packages before it, never one after it."""
NOT_IN_CORE = ("dagster", "dagster_pipes", "dagster_k8s", "dagster_aws", "dagster_webserver", "mlflow",
               "dvc", "boto3", "botocore")
"""What blip_core, the plain PyTorch library, never imports."""
MODEL_CODE = "resources/mlflow_pyfunc.py"
"""The pyfunc model's code, loaded where only MLflow, PyTorch and blip_core are installed."""


def module_name(rel: str) -> str:
    """``assets/checks.py`` -> ``assets.checks``; ``assets/__init__.py`` -> ``assets``."""
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, rel: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every import in a module's source (relative ones resolved)."""
    package = module_name(rel).split(".")
    if not rel.endswith("__init__.py"):
        package = package[:-1]
    for node in ast.walk(ast.parse(source, rel)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            yield node.lineno, node.args[0].value


def violations(sources: Mapping[str, str]) -> list[str]:
    """What breaks the layering in ``{path relative to the root: source}``."""
    found = []
    for rel, source in sorted(sources.items()):
        own = rel.split("/")[0]
        allowed = set(LAYERS[: LAYERS.index(own) + 1])
        for line, name in imports(source, rel):
            top = name.split(".")[0]
            if top in LAYERS and top not in allowed:
                found.append(f"{rel}:{line}: {own} imports {name} (a layer above it)")
            if own == "blip_core" and top in NOT_IN_CORE:
                found.append(f"{rel}:{line}: blip_core imports {name}")
            if rel == MODEL_CODE and (top in LAYERS[1:] or top.startswith("dagster")):
                found.append(f"{rel}:{line}: the pyfunc model code imports {name}")
    return found


def repository_sources() -> dict[str, str]:
    return {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
            for package in LAYERS for path in sorted((ROOT / package).rglob("*.py"))}


def test_every_package_imports_only_the_layers_below_it():
    sources = repository_sources()
    for package in LAYERS:  # the walk found each package's modules
        assert f"{package}/__init__.py" in sources and sum(r.startswith(f"{package}/") for r in sources) > 1
    found = violations(sources)
    assert not found, "\n".join(found)


@pytest.mark.parametrize(("rel", "source"), [
    ("assets/data.py", "def f():\n    from orchestration.sensors import landing_sensor\n"),
    ("resources/storage.py", "from assets.keys import GROUP\n"),
    ("resources/landing.py", "import assets.publishing\n"),
    ("assets/tools.py", "if TYPE_CHECKING:\n    import orchestration.main\n"),
    ("resources/dvc.py", "import importlib\nmain = importlib.import_module('orchestration.main')\n"),
    ("blip_core/train.py", "def log():\n    import mlflow\n"),
    ("blip_core/io.py", "from dagster import asset\n"),
    ("blip_core/data/ingest.py", "from resources.storage import Dataset\n"),
    ("resources/mlflow_pyfunc.py", "from resources.redaction import redact\n"),
    ("assets/evals.py", "defs = __import__('orchestration.definitions')\n"),
])
def test_the_check_finds_an_import_against_the_layering(rel: str, source: str):
    assert len(violations({rel: source})) == 1


def test_the_check_allows_imports_downwards_and_within_a_package():
    assert violations({
        "orchestration/main.py": "import assets\nfrom resources.storage import Dataset\nimport blip_core\n",
        "assets/models.py": "from assets.checks import ShardPolicy\nfrom resources.dvc import DvcResource\n",
        "resources/launcher.py": "from .redaction import redact_uri\nfrom blip_core import config\n",
        "blip_core/train.py": "from . import io\nimport torch\n",
    }) == []
