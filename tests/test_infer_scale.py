"""--scale K: the renderer against an independent per-pixel oracle at fractional coordinates
(ASAPNET.md formula with real-valued x, y), K = 1 equal to the normal output, torch, ONNX Runtime and
OpenVINO."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from asap_deploy.config import ModelConfig
from asap_deploy.engines import IMAGE_FLOAT, create_engine
from asap_deploy.errors import InputError, UsageError
from asap_deploy.export.bundle import export_model, load_bundle
from asap_deploy.random_model import random_generator, random_label_maps
from asap_deploy.app.scale import ScaledRenderer, check_scale, scaled_size

CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, crop_size=128, learned_ds_factor=8, lr_width=8,
                  lr_max_width=8, lr_depth=1, hr_width=16)  # S=8


# every backend with the scaled stage (openvino: where it is installed, as in CI's [test] extra)
BACKENDS = ["torch", "onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    b = load_bundle(export_model(random_generator(CFG, 4), tmp_path_factory.mktemp("s") / "b", fp16=False).path)
    return {n: create_engine(n, b) for n in BACKENDS}


def oracle(labels: np.ndarray, params: np.ndarray, k: float, height: int, width: int, cfg: ModelConfig,
           hires: np.ndarray | None = None) -> np.ndarray:
    """Per output pixel, float64: source (x'/k, y'/k), its tile, PE at the real coordinate, the id of
    the source pixel containing it (or of the high-res map), the MLP read from the public layout."""
    S, n_lab = cfg.S, cfg.n_label_channels  # noqa: N806
    ch = cfg.mlp_channels
    ho, wo = math.ceil(height * k - 1e-9), math.ceil(width * k - 1e-9)
    out = np.zeros((labels.shape[0], ho, wo, 3))
    for n in range(labels.shape[0]):
        for yo in range(ho):
            for xo in range(wo):
                x, y = xo / k, yo / k
                p = params[n, :, int(y // S), int(x // S)].astype(np.float64)
                lab = int(hires[n, yo, xo] if hires is not None else labels[n, int(math.floor(y)), int(math.floor(x))])
                lab = n_lab - 1 if lab == 255 else lab
                pe, f = [], S
                while f > 1:
                    ax, ay = 2 * math.pi * math.fmod(x, f) / f, 2 * math.pi * math.fmod(y, f) / f
                    pe += [math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay)]
                    f //= 2
                v = np.concatenate([np.eye(n_lab)[lab], pe])
                off = 0
                for li, (cin, cout) in enumerate(zip(ch[:-1], ch[1:])):
                    b = p[off:off + cout]
                    wgt = p[off + cout:off + cout + cin * cout].reshape(cin, cout)
                    off += cout + cin * cout
                    v = v @ wgt + b
                    v = np.tanh(v) if li == len(ch) - 2 else np.where(v > 0, v, 0.01 * v)
                out[n, yo, xo] = v
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_k1_equals_normal_output(engines, backend):
    e = engines[backend]
    labels, _ = random_label_maps(CFG, 2, 24, 32, seed=5)
    normal = e.generate(labels)[IMAGE_FLOAT]
    got = ScaledRenderer(e).render(e.predict_params(labels), labels, 1.0, 24, 32)
    assert got.shape == normal.shape
    np.testing.assert_allclose(got, normal, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,h,w", [(2.0, 16, 24), (1.5, 13, 21), (2.75, 9, 16)])
def test_scaled_matches_fractional_oracle(engines, backend, k, h, w):
    e = engines[backend]
    rng = np.random.default_rng(int(k * 100) + h)
    labels = rng.integers(0, CFG.n_label_channels, (1, h, w)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.1] = 255
    from asap_deploy.app.infer import pad_to_multiple

    padded = pad_to_multiple(labels[0], CFG.S)[None]
    params = e.predict_params(padded)
    got = ScaledRenderer(e).render(params, padded, k, h, w)
    want = oracle(padded, params, k, h, w, CFG)
    assert got.shape == want.shape == (1, scaled_size(h, k), scaled_size(w, k), 3)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hires_labels_against_oracle(engines, backend):
    e = engines[backend]
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 5, (1, 16, 16)).astype(np.uint8)
    hires = rng.integers(0, 5, (1, 32, 32)).astype(np.uint8)
    params = e.predict_params(labels)
    r = ScaledRenderer(e)
    np.testing.assert_allclose(r.render(params, labels, 2.0, 16, 16, hires), oracle(labels, params, 2.0, 16, 16, CFG, hires),
                               atol=2e-5)
    # a high-res map that is the nearest upscaling of the input gives the plain --scale output
    near = labels.repeat(2, 1).repeat(2, 2)
    np.testing.assert_array_equal(r.render(params, labels, 2.0, 16, 16, near), r.render(params, labels, 2.0, 16, 16))
    with pytest.raises(InputError, match="needs 32x32"):
        r.render(params, labels, 2.0, 16, 16, hires[:, :30])


def test_scale_values_checked():
    for bad in (0, -1, float("nan"), 0.5):
        with pytest.raises(UsageError):
            check_scale(bad)
    assert scaled_size(10, 1.0) == 10 and scaled_size(10, 2.5) == 25 and scaled_size(3, 1.5) == 5
