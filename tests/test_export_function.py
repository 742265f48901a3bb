"""The SpatialMLP local-function body alone (ONNX Runtime) and the PyTorch per-tile pixelwise,
both against the per-pixel numpy oracle, on random ids and random parameters."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from asap_deploy.config import ModelConfig
from asap_deploy.export import graphs
from asap_deploy.model import pixelwise
from asap_deploy.plugins import spec
from oracles import pixelwise_oracle

CONFIGS = [
    ModelConfig(label_nc=5, crop_size=64, learned_ds_factor=4, hr_width=8, hr_depth=3),  # S=4
    ModelConfig(label_nc=3, crop_size=128, learned_ds_factor=4, hr_width=16, hr_depth=5),  # S=8
    ModelConfig(label_nc=7, contain_dontcare_label=True, crop_size=128, aspect_ratio=2.0, learned_ds_factor=4,
                hr_width=8, hr_depth=2),  # S=4, don't care channel
]


def function_only_model(cfg: ModelConfig, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A graph that is just the SpatialMLP node over its two inputs (ids INT32, params)."""
    node = helper.make_node(spec.OP_NAME, ["ids", "params"], ["rgb"], domain=spec.DOMAIN,
                            **spec.node_attributes(cfg))
    g = helper.make_graph(
        [node], "spatial_mlp_only",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", "H", "W"]),
         helper.make_tensor_value_info("params", dtype, ["N", cfg.num_params, "h", "w"])],
        [helper.make_tensor_value_info("rgb", dtype, ["N", "H", "W", cfg.output_nc])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", graphs.OPSET),
                                            helper.make_opsetid(spec.DOMAIN, 1)],
                          functions=[graphs.spatial_mlp_function(cfg)], ir_version=graphs.IR_VERSION)
    onnx.checker.check_model(m, full_check=True)
    return m


def _random_case(cfg: ModelConfig, seed: int, n: int, gh: int, gw: int):
    rng = np.random.default_rng(seed)
    S = cfg.S  # noqa: N806
    ids = rng.integers(0, cfg.n_label_channels, (n, gh * S, gw * S)).astype(np.int32)
    params = rng.normal(0, 0.4, (n, cfg.num_params, gh, gw)).astype(np.float32)
    return ids, params


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"S{c.S}_lab{c.n_label_channels}_w{c.hr_width}_d{c.hr_depth}")
@pytest.mark.parametrize("seed,n,gh,gw", [(0, 1, 2, 3), (1, 2, 3, 1)])
def test_function_body_and_torch_match_oracle(cfg, seed, n, gh, gw):
    ids, params = _random_case(cfg, seed, n, gh, gw)
    want = pixelwise_oracle(ids, params, cfg.mlp_channels, cfg.S)
    assert want.std() > 0.1, "oracle output is flat: weak test"
    sess = ort.InferenceSession(function_only_model(cfg).SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"ids": ids, "params": params})[0]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    with torch.no_grad():
        tgot = pixelwise(torch.from_numpy(ids).long(), torch.from_numpy(params), cfg).numpy()
    np.testing.assert_allclose(tgot, want, atol=2e-5, rtol=0)


def test_function_body_is_type_generic_fp16():
    cfg = CONFIGS[1]
    ids, params = _random_case(cfg, 3, 1, 2, 2)
    want = pixelwise_oracle(ids, params.astype(np.float16).astype(np.float32), cfg.mlp_channels, cfg.S)
    sess = ort.InferenceSession(function_only_model(cfg, TensorProto.FLOAT16).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"ids": ids, "params": params.astype(np.float16)})[0]
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - want).max() < 2e-2
