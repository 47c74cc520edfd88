"""Every benchmark script runs end to end in its --smoke mode (tiny shapes, a CPU, interpret mode),
so that none of them rots between the GPU runs that produce docs/benchmarks.md."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELPERS = {"__init__", "profiling", "report", "timing"}  # imported by the scripts, not run
# script -> (extra arguments, the results file it must write under $OUT)
SMOKES = {
    "generate": ([], "generate.json"),
    "eval": ([], "eval.json"),
    "kernels": (["--out", "{out}"], "results.json"),
    "listops": ([], "listops.json"),
    "multi_gpu": ([], "multi_gpu.jsonl"),
    "tokenization": (["--out", "{out}"], "tokenization.json"),
    "train_throughput": ([], "train_throughput.json"),
}


def test_every_script_has_a_smoke_run():
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - HELPERS
    assert scripts == set(SMOKES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKES))
def test_smoke_run_exits_0_and_writes_its_results(script, tmp_path):
    args, results = SMOKES[script]
    env = dict(os.environ, OUT=str(tmp_path), JAX_PLATFORMS="cpu", TNLLM_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", f"bench.{script}", "--smoke",
                           *(a.format(out=tmp_path) for a in args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / results).read_text()
    # The scripts record a case that raises as a row's "error" and go on, so exit 0 alone would
    # pass a broken case.
    errors = [e for line in (text.splitlines() if results.endswith(".jsonl") else [text])
              for e in _errors(json.loads(line))]
    assert text and not errors, errors


def _errors(tree):
    """Every "error" value in a JSON tree."""
    if isinstance(tree, dict):
        return ([tree["error"]] if "error" in tree else []) + [e for v in tree.values() for e in _errors(v)]
    if isinstance(tree, list):
        return [e for v in tree for e in _errors(v)]
    return []


def test_train_throughput_impls_name_the_lightning_kernel():
    """--impls=pallas:mosaic traces the step with the Mosaic kernels' plan (which a CPU refuses),
    pallas alone keeps the default plan, and an unknown kernel gets one sentence."""
    import jax.numpy as jnp

    from bench.train_throughput import kernel_of
    from pallas_kernels import lightning

    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    with kernel_of("pallas:mosaic"), pytest.raises(ValueError, match="Mosaic GPU kernels run"):
        lightning.lightning_attention(q, q, q, jnp.ones(2), interpret=True)
    with kernel_of("pallas"):
        o, _ = lightning.lightning_attention(q, q, q, jnp.ones(2), interpret=True)
    assert o.shape == q.shape
    with pytest.raises(ValueError, match="names kernel 'cuda'"):
        with kernel_of("pallas:cuda"):
            pass
