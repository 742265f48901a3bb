"""Engine interface: input checks shared by backends, backend names, and ONNX Runtime without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asap_deploy.config import ModelConfig
from asap_deploy.engines import IMAGE, IMAGE_FLOAT, check_backend, create_engine
from asap_deploy.engines.tiled import tile_blocks
from asap_deploy.errors import InputError, UsageError
from asap_deploy.export.bundle import export_model, load_bundle
from asap_deploy.random_model import random_generator, random_label_maps

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(label_nc=9, contain_dontcare_label=True, instance_edges=True, crop_size=256,
                  learned_ds_factor=8, lr_width=8, lr_max_width=8, lr_depth=1)  # S=16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(export_model(random_generator(CFG, 2), tmp_path_factory.mktemp("e") / "b").path)


@pytest.fixture(scope="module")
def engines(bundle):
    return create_engine("torch", bundle), create_engine("onnxruntime", bundle)


def test_stages_compose_to_end_to_end(engines):
    labels, inst = random_label_maps(CFG, 2, 32, 48, seed=1)
    for e in engines:
        full = e.generate(labels, inst)
        staged = e.pixelwise(labels, e.predict_params(labels, inst))
        assert full[IMAGE].dtype == np.uint8 and full[IMAGE].shape == (2, 32, 48, 3)
        np.testing.assert_allclose(staged[IMAGE_FLOAT], full[IMAGE_FLOAT], atol=1e-5)
        assert np.array_equal(e.run(labels, inst), full[IMAGE])


@pytest.mark.parametrize("pixels_per_run", [16 * 16, 3 * 16 * 16, 2 * 48 * 16, 32 * 48, 2 * 32 * 48])
def test_onnxruntime_tile_blocks_equal_one_run_and_torch(bundle, engines, pixels_per_run):
    """Capped runs (single tiles, runs of tiles, bands of tile rows, one or two whole images per
    run) give the bytes of one run of the end-to-end graph, and match the PyTorch model."""
    labels, inst = random_label_maps(CFG, 3, 32, 48, seed=7)
    one_run = create_engine("onnxruntime", bundle, pixels_per_run=10**9).generate(labels, inst)
    capped = create_engine("onnxruntime", bundle, pixels_per_run=pixels_per_run)
    got = capped.generate(labels, inst)
    assert np.array_equal(got[IMAGE], one_run[IMAGE])
    np.testing.assert_allclose(got[IMAGE_FLOAT], one_run[IMAGE_FLOAT], atol=1e-5)
    np.testing.assert_allclose(got[IMAGE_FLOAT], engines[0].generate(labels, inst)[IMAGE_FLOAT], atol=1e-3)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 3), th=st.integers(1, 6), tw=st.integers(1, 6), S=st.sampled_from([1, 2, 4]),
       max_pixels=st.integers(1, 400))
def test_tile_blocks_cover_every_pixel_once_in_whole_tiles(n, th, tw, S, max_pixels):  # noqa: N803
    h, w = th * S, tw * S
    hits = np.zeros((n, h, w), np.int32)
    for i, rows, cols in tile_blocks((n, h, w), S, max_pixels):
        block = hits[i, rows, cols]
        assert block.size <= max(max_pixels, S * S)
        assert rows.start % S == cols.start % S == 0 and block.shape[1] % S == block.shape[2] % S == 0
        hits[i, rows, cols] += 1
    assert (hits == 1).all()


@pytest.mark.parametrize("labels,inst,message", [
    # channels 0..9 (9 labels + don't care), id 255 valid, id 10 not
    (np.full((1, 16, 16), 10, np.uint8), True, "label id 10 is out of range: this model takes ids 0..9 or 255"),
    (np.zeros((1, 16, 20), np.uint8), True, "multiples of S=16"),
    (np.zeros((16, 16), np.uint8), True, r"must be \(N, H, W\)"),
    (np.zeros((1, 16, 16), np.float32), True, "integer ids"),
    (np.zeros((1, 16, 16), np.uint8), False, "instance map is required"),
])
def test_bad_inputs_are_refused_by_every_backend(engines, labels, inst, message):
    instances = np.zeros(labels.shape, np.int32) if inst else None
    for e in engines:
        with pytest.raises(InputError, match=message):
            e.generate(labels, instances)


def test_dontcare_id_accepted(engines):
    labels, inst = random_label_maps(CFG, 1, 32, 32, seed=4)
    labels[0, :8, :8] = 255
    torch_e, ort_e = engines
    a, b = torch_e.generate(labels, inst), ort_e.generate(labels, inst)
    assert np.abs(a[IMAGE_FLOAT] - b[IMAGE_FLOAT]).max() < 1e-3


def test_backend_names():
    assert check_backend("onnxruntime") == "onnxruntime"
    with pytest.raises(UsageError, match="did you mean 'onnxruntime'"):
        check_backend("onnxruntme")
    with pytest.raises(UsageError, match="choose from: torch, onnxruntime"):
        check_backend("tvm")


def test_torch_backend_has_no_fp16(bundle):
    with pytest.raises(UsageError, match="fp32 reference"):
        create_engine("torch", bundle, "fp16")


def test_onnxruntime_engine_runs_without_torch(bundle):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from asap_deploy.export.bundle import load_bundle\n"
        "from asap_deploy.engines import create_engine\n"
        f"e = create_engine('onnxruntime', load_bundle({str(bundle.path)!r}))\n"
        "img = e.run(np.zeros((1, 16, 32), np.uint8), np.zeros((1, 16, 32), np.int32))\n"
        "assert img.shape == (1, 16, 32, 3) and img.dtype == np.uint8\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_torch_engine_fused_kernel_path_matches_per_tile(monkeypatch):
    """The torch engine's fused-kernel path (what it uses on CUDA), run in Triton's interpreter."""
    pytest.importorskip("triton")
    import torch

    from asap_deploy.config import ModelConfig
    from asap_deploy.engines.torch_engine import TorchEngine
    from asap_deploy.model import ASAPNetGenerator

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = ModelConfig(label_nc=5, crop_size=128, learned_ds_factor=4, lr_width=8, lr_max_width=16, lr_depth=1)
    torch.manual_seed(0)
    model = ASAPNetGenerator(cfg)
    with torch.no_grad():
        model.lowres_stream.model[-1].weight.mul_(0.3)
    labels = np.random.default_rng(0).integers(0, 5, (2, 16, 24))
    fused = TorchEngine(model, fused=True)
    assert fused.describe()["pixelwise"] == "fused Triton kernel"
    assert TorchEngine(model).fused is False  # CPU default: per-tile fp32
    want = TorchEngine(model, fused=False).generate(labels)
    got = fused.generate(labels)
    assert 0.05 < np.abs(want["image_float"]).mean() < 0.9
    np.testing.assert_allclose(got["image_float"], want["image_float"], atol=2e-2)  # fp16 dots
    assert np.abs(got["image"].astype(int) - want["image"]).max() <= 3
