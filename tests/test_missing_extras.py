"""Every command in an install that lacks one optional dependency: it works without it, or it stops
with one line naming the extra that installs it (exit 6), never a traceback (issue 14, item 1).

One fresh interpreter per blocked module (`sys.modules[name] = None`, as a missing package looks
to `import`) runs every command through the CLI; a run with nothing blocked gives each command's
ordinary exit code to compare with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# module blocked -> the extra whose name the error must carry (None: whichever the command names)
MODULES = {
    "torch": "torch",
    "matplotlib": "torch",
    "onnxconverter_common": "torch",
    "triton": None,  # compile-kernels: [gpu]; build-engine: the flavour's extra ([rtx] / [tensorrt])
    "tensorrt_rtx": "rtx",
    "tensorrt": None,
    "cuda": None,
    "tritonclient": "serve",
    "pytriton": "serve",
    "ray": "ray",
    "openvino": "openvino",
}

# (command, blocked module) pairs that cannot work and must name this extra
MUST_NAME = {
    ("inspect", "torch"): "torch",
    ("export", "torch"): "torch",
    ("export", "onnxconverter_common"): "torch",
    ("validate", "torch"): "torch",
    ("bench", "torch"): "torch",  # the authors' PyTorch forward is every run's baseline
    ("compile-kernels", "triton"): "gpu",
    ("build-engine", "triton"): "rtx",
    ("build-engine", "tensorrt_rtx"): "rtx",
    ("train", "torch"): "torch",
    ("train", "matplotlib"): "torch",
    ("demo", "torch"): "torch",
    ("infer-model", "torch"): "torch",
    ("infer-ray", "ray"): "ray",
    ("serve", "pytriton"): "serve",
    ("loadtest", "tritonclient"): "serve",
    ("triton-repo", "tritonclient"): "serve",
    ("infer-openvino", "openvino"): "openvino",
}

# commands too slow to run under every block: only under these (and with nothing blocked)
ONLY_UNDER = {
    "infer-ray": {"ray"},
    "demo": {"torch", "matplotlib", "onnxconverter_common"},
    "compile-kernels": {"triton", "cuda", "torch"},
}

RUNNER = r"""
import json, sys
blocked = sys.argv[1]
if blocked:
    sys.modules[blocked] = None
from typer.testing import CliRunner
from asap_deploy.cli import app
commands = json.loads(sys.argv[2])
results = {}
for name, args in commands.items():
    r = CliRunner().invoke(app, args)
    exc = r.exception
    results[name] = {"code": r.exit_code, "output": r.output,
                     "crash": None if exc is None or isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"}
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import torch

    from asap_deploy.checkpoints import save_generator
    from asap_deploy.config import ModelConfig
    from asap_deploy.export.bundle import export_checkpoint
    from asap_deploy.io import write_png
    from asap_deploy.model import ASAPNetGenerator
    from asap_deploy.synthetic_dataset import make_dataset

    w = tmp_path_factory.mktemp("extras")
    cfg = ModelConfig(label_nc=4, crop_size=64, learned_ds_factor=4, lr_width=8, lr_max_width=8, lr_depth=1)
    torch.manual_seed(0)
    save_generator(ASAPNetGenerator(cfg), w / "m.pt")
    export_checkpoint(w / "m.pt", w / "bundle", fp16=False)
    write_png(w / "a.png", (np.arange(16 * 16).reshape(16, 16) % 4).astype(np.uint8))
    make_dataset(w / "data", 2, 1, 32, 4, 0)
    return w


def commands(w: Path, out: Path) -> dict[str, list[str]]:
    s = lambda p: str(p)  # noqa: E731
    return {
        "inspect": ["inspect", s(w / "m.pt")],
        "export": ["export", s(w / "m.pt"), "-o", s(out / "bundle")],
        "triton-repo": ["export", s(w / "bundle"), "--triton-repo", s(out / "repo")],
        "validate": ["validate", s(w / "bundle"), "--random", "1", "--report", s(out / "val")],
        "compile-kernels": ["compile-kernels", "-o", s(out / "kernels"), "--arch", "sm_80", "--preset", "facades",
                            "--out-dtype", "fp32"],
        "build-engine": ["build-engine", s(w / "bundle"), "--flavor", "rtx", "--stage", "pixelwise", "--arch",
                         "sm_80", "-o", s(out / "engines")],
        "make-data": ["make-data", s(out / "data"), "--n", "2", "--size", "32"],
        "train": ["train", "--data", s(w / "data"), "--out", s(out / "run"), "--steps", "1"],
        "demo": ["demo", "--out", s(out / "demo"), "--steps", "1", "--bench-size", "16"],
        "infer-bundle": ["infer", s(w / "a.png"), "--bundle", s(w / "bundle"), "-b", "onnxruntime", "-o",
                         s(out / "inf")],
        "infer-model": ["infer", s(w / "a.png"), "--model", s(w / "m.pt"), "-o", s(out / "inf-m")],
        "infer-openvino": ["infer", s(w / "a.png"), "--bundle", s(w / "bundle"), "-b", "openvino", "-o",
                           s(out / "inf-ov")],
        "infer-ray": ["infer", s(w / "a.png"), "--bundle", s(w / "bundle"), "-b", "onnxruntime", "--ray", "local",
                      "-o", s(out / "inf-r")],
        "bench": ["bench", "--bundle", s(w / "bundle"), "-b", "onnxruntime", "--size", "16x16", "--iterations", "1",
                  "--duration", "0", "--warmup", "0", "--no-memory", "-o", s(out / "bench")],
        "doctor": ["doctor"],
        "serve": ["serve", s(w / "no-such-bundle")],  # fails after its dependency check, never serves
        "loadtest": ["loadtest", "http://127.0.0.1:9", "-n", "1", "--timeout", "1"],
    }


def run_all(w: Path, blocked: str) -> dict:
    out = w / f"out-{blocked or 'none'}"
    cmds = {k: v for k, v in commands(w, out).items() if not blocked or blocked in ONLY_UNDER.get(k, {blocked})}
    env_cache = {"ASAP_KERNEL_CACHE": str(w / "kernel-cache"), "COLUMNS": "400"}
    import os

    res = subprocess.run([sys.executable, "-c", RUNNER, blocked, json.dumps(cmds)], capture_output=True, text=True,
                         cwd=w, env={**os.environ, **env_cache}, timeout=900)
    assert "RESULTS" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.split("RESULTS", 1)[1])


@pytest.fixture(scope="module")
def baseline(inputs):
    return run_all(inputs, "")


@pytest.mark.slow
@pytest.mark.parametrize("blocked", sorted(MODULES))
def test_each_command_names_the_missing_extra(inputs, baseline, blocked):
    got = run_all(inputs, blocked)
    problems = []
    for name, r in got.items():
        base = baseline[name]
        errors = [line for line in r["output"].splitlines() if line.startswith("error:")]
        want = MUST_NAME.get((name, blocked))
        if r["crash"] or "Traceback" in r["output"] or "ModuleNotFoundError" in r["output"]:
            problems.append(f"{name}: crashed: {r['crash'] or r['output'][-500:]}")
        elif want is not None and (r["code"] != 6 or len(errors) != 1 or f"asap-deploy[{want}]" not in errors[0]):
            problems.append(f"{name}: wanted exit 6 naming asap-deploy[{want}], got {r['code']}: {r['output'][-400:]}")
        elif r["code"] == 6 and base["code"] != 6:
            extra = MODULES[blocked]
            if len(errors) != 1 or "asap-deploy[" not in errors[0] or (extra and f"[{extra}]" not in errors[0]):
                problems.append(f"{name}: exit 6 without one line naming the extra: {r['output'][-400:]}")
        elif r["code"] != base["code"] and r["code"] != 6:
            problems.append(f"{name}: exit {r['code']} (without {blocked}) vs {base['code']}: {r['output'][-400:]}")
    assert not problems, "\n".join(problems)


def test_baseline_commands_work(baseline):
    """The commands of the matrix do their work when nothing is blocked (else the matrix proves little)."""
    ok = {"inspect", "export", "triton-repo", "validate", "compile-kernels", "build-engine", "make-data", "train",
          "demo", "infer-bundle", "infer-model", "infer-openvino", "bench", "doctor"}
    bad = {k: (v["code"], v["output"][-300:]) for k, v in baseline.items() if k in ok and v["code"] != 0}
    assert not bad, bad
