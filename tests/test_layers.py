"""The import layers declared in pyproject.toml hold: `lint-imports` (import-linter) keeps them, and
every module of the two packages sits in a layer."""
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib

from conftest import REPO, subprocess_env

import pallas_kernels
import tnllm


def _lint_imports() -> str:
    """The `lint-imports` of this interpreter's environment (beside it, else on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    found = beside if os.path.exists(beside) else shutil.which("lint-imports")
    assert found, "lint-imports is not installed: pip install -r requirements.txt (import-linter)."
    return found


def test_import_contracts_are_kept():
    run = subprocess.run([_lint_imports(), "--no-cache"], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_every_module_has_a_layer():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    named = {name.strip("() ") for layer in layers for name in re.split(r"[|:]", layer)}
    for package in (tnllm, pallas_kernels):
        for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            covered = any(module.name == n or module.name.startswith(n + ".") for n in named)
            assert covered, (f"{module.name} is in no import layer; add it to a layer of "
                             "[tool.importlinter] in pyproject.toml.")
