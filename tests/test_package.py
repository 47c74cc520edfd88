"""The package as users install it: `pip install .` into a fresh virtual environment, and what the
default install and its extras pull in."""
import os
import shutil
import site
import subprocess
import sys
import tomllib

from conftest import REPO


def _project():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _names(requirements):
    return {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
            for r in requirements}


def test_the_default_install_pulls_in_no_torch():
    project = _project()
    assert "torch" not in _names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "torch" in _names(extras["hf"])  # .bin checkpoints
    assert {"zstandard", "pyarrow", "datasets"} <= _names(extras["data"])
    assert "lm_eval" in _names(extras["eval"])
    assert "tnllm[hf,data,eval]" in extras["test"]  # the tests read .bin files and every corpus format


def test_pip_install_gives_a_package_that_runs_from_any_directory(tmp_path):
    # A copy of what a wheel is built from, so the build leaves nothing in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source)
    for package in ("tnllm", "pallas_kernels"):
        shutil.copytree(os.path.join(REPO, package), source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    # A fresh environment that sees this interpreter's installed dependencies (not this checkout)
    # and gets tnllm itself only from the install below, without a download.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    paths = site.getsitepackages() + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                      if p and os.path.abspath(p) != REPO]
    with open(os.path.join(purelib, "dependencies.pth"), "w") as f:
        f.write("\n".join(paths) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)],
                   check=True, env=env, cwd=tmp_path)
    shutil.rmtree(source)  # the installed copy must not need it

    def run(*args):
        result = subprocess.run([python, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        # absl's --help exits with status 1 after printing the help, argparse's with 0.
        assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr
        return result.stdout

    found = run("-c", "import importlib.metadata as m, tnllm, pallas_kernels; print(tnllm.__file__); "
                      "print(*m.requires('tnllm'), sep='\\n')").splitlines()
    assert found[0].startswith(purelib)
    assert "torch" not in _names(r for r in found[1:] if "extra ==" not in r)
    assert "--max_new_tokens" in run("-m", "tnllm.generate", "--help")
    assert "--hf_dir" in run("-m", "tnllm.convert", "--help")
    assert "export" in run("-m", "tnllm.checkpoint", "--help")
