"""The small version of benchmarks/infer_load.py: 50 maps + one corrupt file through `asap infer`
in a fresh process: every good map written, the bad one reported, exit 5; and a batch the model
cannot run (a map smaller than its reflection padding needs) fails only its own inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from asap_deploy.errors import InputError

from .conftest import ROOT, label_maps, run_cli, save_png


def test_fifty_maps_one_bad(tmp_path, bundle_dir):
    maps, _ = label_maps(5, 24, 32, seed=11)
    for i in range(50):
        save_png(tmp_path / "in" / f"m{i:03d}.png", maps[i % 5])
    (tmp_path / "in" / "m025_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "infer", str(tmp_path / "in"), "--bundle",
                        str(bundle_dir), "-o", str(tmp_path / "out"), "--backend", "onnxruntime", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == InputError.exit_code, r.stderr[-2000:]
    report = json.loads(r.stdout[r.stdout.index("{"):])
    failed = [f["input"] for f in report["files"] if f["error"]]
    assert len(report["files"]) == 51 and len(failed) == 1 and failed[0].endswith("m025_bad.png")
    assert len(list((tmp_path / "out").glob("*.png"))) == 50
    assert "Traceback" not in r.stderr


def test_a_batch_the_backend_cannot_run_fails_only_its_inputs(tmp_path):
    """S=16 with reflection padding in the low-res stream: a 16x16 map gives a 1x1 grid, which ONNX
    Runtime's reflect Pad refuses. That map fails with a message; a 64x64 one is written."""
    from asap_deploy.config import ModelConfig
    from asap_deploy.export.bundle import export_model
    from asap_deploy.random_model import random_generator

    cfg = ModelConfig(label_nc=4, crop_size=256, lr_width=8, lr_max_width=8, hr_width=8, reflection_pad=True)
    b = export_model(random_generator(cfg, 0), tmp_path / "b", fp16=False).path
    save_png(tmp_path / "in" / "tiny.png", np.zeros((16, 16), np.uint8))
    save_png(tmp_path / "in" / "ok.png", (np.arange(64 * 64).reshape(64, 64) % 4).astype(np.uint8))
    run_cli(["infer", tmp_path / "in", "--bundle", b, "--backend", "onnxruntime", "-o", tmp_path / "o2"],
            InputError.exit_code, names=("tiny.png",), says=("ONNX Runtime could not run", "1 of 2"))
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["ok.png"]
