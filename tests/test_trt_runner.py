"""TensorRT runner logic that needs no GPU: buffer sizes, shape keys, profile range checks, engine
lookup messages, and that the runner and the plugin import without torch and Triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from asap_deploy.engines.tensorrt import ALIGN, buffer_plan, check_input_range, find_engine, shape_key
from asap_deploy.errors import EngineError

ROOT = Path(__file__).resolve().parents[1]


def test_buffer_plan_sizes_and_alignment():
    rng = np.random.default_rng(0)
    for _ in range(20):
        shape = tuple(int(v) for v in rng.integers(1, 50, 4))
        dt = rng.choice([np.uint8, np.float16, np.float32, np.int32])
        got = buffer_plan({"x": shape}, {"x": dt})["x"]
        need = int(np.prod(shape)) * np.dtype(dt).itemsize
        assert got >= need and got % ALIGN == 0 and got - need < ALIGN
    with pytest.raises(EngineError, match="unresolved shape"):
        buffer_plan({"x": (-1, 4)}, {"x": np.float32})


def test_shape_key_changes_with_shape_and_dtype_only():
    a = {"labels": np.zeros((1, 32, 32), np.uint8)}
    assert shape_key(a) == shape_key({"labels": np.ones((1, 32, 32), np.uint8)})
    assert shape_key(a) != shape_key({"labels": np.zeros((1, 32, 48), np.uint8)})
    assert shape_key(a) != shape_key({"labels": np.zeros((1, 32, 32), np.int32)})


def test_input_range_against_profile():
    prof = {"inputs": {"labels": {"min": [1, 16, 16], "opt": [1, 64, 64], "max": [2, 128, 96]}}}
    check_input_range("labels", (2, 128, 96), prof)
    check_input_range("other", (9, 9), prof)  # not in the profile: TensorRT decides
    for bad in [(3, 16, 16), (1, 16, 112), (1, 8, 16), (1, 16)]:
        with pytest.raises(EngineError, match=r"outside the engine's profile.*--min/--max"):
            check_input_range("labels", bad, prof)


def test_find_engine_says_how_to_build(tmp_path):
    bundle = SimpleNamespace(path=tmp_path)
    with pytest.raises(EngineError, match=rf"asap build-engine {tmp_path} --flavor rtx --stage end-to-end --fp16"):
        find_engine(bundle, "asap", "fp16", "rtx")
    (tmp_path / "pixelwise.fp32.tensorrt.engine").write_bytes(b"x")
    assert find_engine(bundle, "pixelwise", "fp32", "tensorrt").name == "pixelwise.fp32.tensorrt.engine"


def test_runner_and_plugin_import_without_torch_or_triton():
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "triton"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        import asap_deploy.engines.tensorrt, asap_deploy.plugins.tensorrt, asap_deploy.plugins.plugin_core
        from asap_deploy.plugins import launcher
        assert "torch" not in sys.modules and "triton" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
