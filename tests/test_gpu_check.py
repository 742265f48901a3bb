"""benchmarks/gpu_check.py --smoke in CI: the one prepared GPU check must not rot. On the CPU it
runs the fused kernel through the Triton interpreter against the fp32 reference (random inputs and
an authors' fixture), compiles the kernel ahead of time for sm_90 without a GPU, round-trips the
plugin's fields, times the CPU stages, and marks every GPU-only section skipped with the reason.
The script is run as a user runs it: a separate process, from another folder, PYTHONPATH = the
repository root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["environment", "kernel", "torch_cuda", "latency", "plugin_enqueue", "graph_capture", "capture_failure",
            "threads"]
GPU_ONLY = ["torch_cuda", "graph_capture", "capture_failure", "threads"]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "ASAP_KERNEL_CACHE", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_smoke_run_writes_its_report_and_passes(tmp_path):
    out = tmp_path / "report"
    p = run(tmp_path, "--smoke", "--out", str(out))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "PASSED" in p.stdout.splitlines()[-1]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["schema"] == "asap-deploy/gpu-check" and rep["mode"] == "smoke" and rep["verdict"] == "PASSED"
    assert sorted(rep["sections"]) == sorted(SECTIONS) and rep["isolated"] is False
    secs = rep["sections"]
    for name in GPU_ONLY:
        assert secs[name]["status"] == "skipped" and "needs a CUDA GPU" in secs[name]["reason"], name
    # the numerical checks that run on the CPU ran and passed
    k = secs["kernel"]
    assert k["status"] == "passed"
    names = [c["name"] for c in k["checks"] if c["passed"] is True]
    assert any(n.startswith("JIT kernel (interpreter), fp16 params, public layout vs fp32 reference (random 64x64")
               for n in names)
    assert any("authors' fixture cityscapes_s16" in n for n in names)
    psnr = [c["psnr_db"] for c in k["checks"] if "psnr_db" in c]
    assert psnr and min(psnr) >= 40.0
    assert not [c for s in secs.values() for c in s["checks"] if c["passed"] is False]
    aot = [c for c in k["checks"] if c["name"].startswith("AOT kernel sm_90")]
    assert aot and aot[0]["cubin_bytes"] > 0
    pe = secs["plugin_enqueue"]
    assert pe["status"] == "passed" and "needs a CUDA GPU" in pe["reason"] and len(pe["checks"]) == 2
    lat = secs["latency"]["data"]["rows"]
    assert {(r["backend"], r["stage"]) for r in lat} >= {("torch fp32 (CPU)", "end_to_end"),
                                                          ("authors fp32 (CPU)", "pixelwise")}
    assert all(r["median_ms"] > 0 and r["p99_ms"] >= r["median_ms"] for r in lat)
    assert secs["environment"]["data"]["environment"]["torch"]
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (smoke run on the CPU)") and "**PASSED**" in md
    for name in SECTIONS:
        assert f"(`{name}`)" in md and f"| {name} |" in md
    assert "| backend | stage | median us |" in md
    marker = json.loads((out / ".asap-deploy.json").read_text())
    assert marker["kind"] == "gpu-check" and marker["files"] == ["gpu_check.json", "gpu_check.md"]

    # again into the same folder, one section in its own process: its own files are replaced
    p = run(tmp_path, "--smoke", "--out", str(out), "--only", "environment", "--isolate", "yes")
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert list(rep["sections"]) == ["environment"] and rep["isolated"] is True
    assert rep["sections"]["environment"]["status"] == "passed"


def test_refuses_a_folder_of_other_files_and_bad_options(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    p = run(tmp_path, "--smoke", "--out", str(tmp_path / "mine"), "--only", "environment")
    assert p.returncode == 2 and "holds files asap did not write" in p.stderr
    assert sorted(x.name for x in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    p = run(tmp_path, "--only", "kernal")
    assert p.returncode == 2 and "unknown section(s) kernal" in p.stderr


# ---- the GPU sections' harness around engines/tensorrt.py's runner, on a stand-in driver ------------
class RecordingCore:
    """The plugin state as enqueue_from_descs sees it: attributes, and an enqueue that records."""

    def __init__(self, cfg):
        from asap_deploy.plugins.plugin_core import normalize_attributes
        from asap_deploy.plugins.spec import node_attributes

        self.attrs, self.calls = normalize_attributes(node_attributes(cfg)), []

    def enqueue(self, *args):
        self.calls.append(args)
        return "cubin"


def test_runner_harness_on_a_stand_in_driver(monkeypatch):
    """What graph_capture, capture_failure and threads build around the real _GraphRunner (a stand-in
    TensorRT engine whose enqueue is the plugin's) is checked here with the fake driver of
    tests/test_trt_runtime_driver.py: shapes, addresses and dtypes reach the plugin's enqueue, graphs
    capture once and replay, both injected capture failures end in one note."""
    import numpy as np

    from asap_deploy.config import ModelConfig
    from asap_deploy.plugins import cuda_driver
    from test_trt_runtime_driver import FakeDriver

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check as gc

    drv = FakeDriver()
    monkeypatch.setattr(cuda_driver, "driver", lambda: drv)
    cfg = ModelConfig(label_nc=6, crop_size=256)  # S = 16
    ctx = drv.cuDevicePrimaryCtxRetain(drv.cuDeviceGet(0)[1])[1]
    drv.cuCtxSetCurrent(ctx)
    stream = drv.cuStreamCreate(1)[1]
    labels = gc.make_labels(cfg, 2, 64, 48, 0)
    params = gc.make_params(cfg, 2, 4, 3, 0)

    core, notes = RecordingCore(cfg), []
    runner, context = gc.make_runner(core, cfg, 2, 64, 48, "fp16", ctx, stream, notes, cuda_graph=True)
    for _ in range(4):
        out = runner.run(gc.runner_feeds(cfg, labels, params, "fp16"))
    assert out["rgb"].shape == (2, 64, 48, 3) and out["rgb"].dtype == np.float16
    assert context.executions == 2 and len(core.calls) == 2 and not notes  # plain, captured; then replays
    assert drv.names().count("cuGraphLaunch") == 3 and not drv.capturing  # runs 2 (after its capture), 3, 4
    ids, prm, rgb, n, h, w, pd, od, s = core.calls[0]
    assert (n, h, w, pd, od, s) == (2, 64, 48, "fp16", "fp16", int(stream))
    assert [ids, prm, rgb] == [context.addr[k] for k in ("ids", "params", "rgb")] and len({ids, prm, rgb}) == 3
    assert context.shapes == {"ids": (2, 64, 48), "params": (2, cfg.num_params, 4, 3)}
    runner.close()

    for fail, said in (("raise", "injected"), ("sync", "STREAM_CAPTURE_INVALIDATED")):
        core, notes = RecordingCore(cfg), []
        runner, context = gc.make_runner(core, cfg, 2, 64, 48, "fp32", ctx, stream, notes, cuda_graph=True, fail=fail)
        for _ in range(4):
            runner.run(gc.runner_feeds(cfg, labels, params, "fp32"))
        assert len(notes) == 1 and said in notes[0] and not runner.cuda_graph and not drv.capturing, (fail, notes)
        assert context.executions == 5 and core.calls[-1][6:8] == ("fp32", "fp32")  # plain from then on
        runner.close()


def test_fixture_maps_and_label_maps_need_neither_pillow_nor_opencv(monkeypatch):
    """The GPU machine gets the checkout and may lack Pillow/OpenCV: the zlib-only PNG reader gives
    exactly what asap_deploy.io reads from every fixture map, and random label maps are numpy-only."""
    import numpy as np

    from asap_deploy.config import preset
    from asap_deploy.io import read_instance_map, read_label_map

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check as gc

    pngs = sorted(gc.FIXTURES.glob("*/*.png"))
    assert len(pngs) >= 7
    for p in pngs:
        want = read_instance_map(p) if p.name.startswith("instance") else read_label_map(p)
        got = gc.read_gray_png(p)
        assert got.shape == want.shape and np.array_equal(got.astype(np.int64), want.astype(np.int64)), p
    cfg = preset("facades")
    lab = gc.make_labels(cfg, 2, 256, 128, seed=3)
    assert lab.dtype == np.uint8 and lab.shape == (2, 256, 128) and lab.max() < cfg.n_label_channels
    assert not np.array_equal(lab[0], lab[1]) and len(np.unique(lab)) >= 5
    tiles = lab[0].reshape(4, 64, 2, 64).transpose(0, 2, 1, 3).reshape(8, -1)
    assert sum(len(np.unique(t)) > 1 for t in tiles) >= 2  # borders inside tiles: the label gather varies per pixel
