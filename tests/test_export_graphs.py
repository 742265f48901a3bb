"""The exported graphs (fp32 and fp16) against the PyTorch generator, through ONNX Runtime (CPU),
for random checkpoints of several configs; graph structure, checker, determinism, dynamic shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from asap_deploy.config import ModelConfig
from asap_deploy.export import graphs
from asap_deploy.export.bundle import export_model, file_name, load_bundle
from asap_deploy.random_model import random_generator, random_label_maps
from asap_deploy.engines.validate import THRESHOLDS, failures, image_metrics, params_metrics
from asap_deploy.io import to_uint8

SMALL_LR = dict(lr_width=8, lr_max_width=16, lr_depth=1)
CONFIGS = {
    # facades-like: 13 labels, reflection padding, S=64 (tent pre-downsample by 4)
    "facades_s64": ModelConfig(label_nc=13, crop_size=1024, reflection_pad=True, **SMALL_LR),
    # cityscapes-like: 35 labels + instance edges, aspect 2, S=16
    "cityscapes_s16": ModelConfig(label_nc=35, instance_edges=True, crop_size=512, aspect_ratio=2.0, **SMALL_LR),
    # non-square aspect 2 at S=32, with a don't-care channel
    "aspect2_dontcare_s32": ModelConfig(label_nc=20, contain_dontcare_label=True, crop_size=1024, aspect_ratio=2.0,
                                        **SMALL_LR),
    # S=32, square
    "plain_s32": ModelConfig(label_nc=8, crop_size=512, **SMALL_LR),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    model = random_generator(cfg, seed=sorted(CONFIGS).index(request.param))
    path = export_model(model, tmp_path_factory.mktemp(request.param) / "bundle").path
    return request.param, cfg, model, load_bundle(path)


def _inputs(cfg: ModelConfig, n: int, h: int, w: int, seed: int):
    labels, inst = random_label_maps(cfg, n, h, w, seed=seed)
    return labels, inst


def _reference(model, labels, inst):
    with torch.no_grad():
        lt = torch.from_numpy(labels)
        it = None if inst is None else torch.from_numpy(inst)
        params = model.predict_params(lt, it)
        pix = model.pixelwise(lt, params).numpy()
        out = model(lt, it).permute(0, 2, 3, 1).numpy()
    return params.numpy(), pix, out


def _session(bundle, graph, precision):
    return ort.InferenceSession(str(bundle.file(graph, precision)), providers=["CPUExecutionProvider"])


def _feeds(sess, **arrays):
    return {i.name: arrays[i.name] for i in sess.get_inputs()}


SIZES = [(2, 2, 3), (1, 3, 2)]  # (batch, H/S, W/S): non-square both ways, batch > 1


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_all_three_graphs_match_pytorch(case, precision):
    name, cfg, model, bundle = case
    S = cfg.S  # noqa: N806
    t = THRESHOLDS[precision]
    for k, (n, gh, gw) in enumerate(SIZES):
        labels, inst = _inputs(cfg, n, gh * S, gw * S, seed=10 + k)
        ref_params, ref_pix, ref_out = _reference(model, labels, inst)
        assert 0.05 < ref_out.std() and (np.abs(ref_out) > 0.999).mean() < 0.1, "reference saturated: weak test"

        params = _session(bundle, "predictor", precision).run(
            ["params"], _feeds(_session(bundle, "predictor", precision), labels=labels, instances=inst))[0]
        pix_sess = _session(bundle, "pixelwise", precision)
        pix_u8, pix_f = pix_sess.run(["image", "image_float"], _feeds(pix_sess, labels=labels, params=ref_params))
        e2e = _session(bundle, "asap", precision)
        out_u8, out_f = e2e.run(["image", "image_float"], _feeds(e2e, labels=labels, instances=inst))

        where = f"{name} {precision} batch {n} {gh * S}x{gw * S}"
        assert params.shape == ref_params.shape and params.dtype == np.float32
        assert out_u8.dtype == np.uint8 and out_u8.shape == (n, gh * S, gw * S, 3) and out_f.dtype == np.float32
        if precision == "fp32":
            np.testing.assert_allclose(params, ref_params, atol=1e-4, rtol=0, err_msg=where)
            for got_f, got_u8, ref_f in ((pix_f, pix_u8, ref_pix), (out_f, out_u8, ref_out)):
                assert np.abs(got_f - ref_f).max() <= 1e-3, where
                lv = np.abs(got_u8.astype(int) - to_uint8(ref_f).astype(int))
                assert lv.max() <= 1 and (lv > 0).mean() < 0.01, where
        else:
            assert not failures("predictor", params_metrics(ref_params, params), t), where
            for got_f, got_u8, ref_f in ((pix_f, pix_u8, ref_pix), (out_f, out_u8, ref_out)):
                m = image_metrics({"image": to_uint8(ref_f), "image_float": ref_f},
                                  {"image": got_u8, "image_float": got_f})
                assert not failures("end_to_end", m, t), (where, m)


def test_graphs_pass_checker_and_shape_inference(case):
    _, cfg, _, bundle = case
    for prec in ("fp32", "fp16"):
        for g in graphs.GRAPH_NAMES:
            m = onnx.load(str(bundle.file(g, prec)))
            onnx.checker.check_model(m, full_check=True)
            inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
            # dynamic batch / H / W, fixed parameter count
            for vi in inferred.graph.input:
                dims = vi.type.tensor_type.shape.dim
                assert dims[0].dim_param == "N"
                if vi.name in ("labels", "instances"):
                    assert [d.dim_param for d in dims] == ["N", "H", "W"]
                if vi.name == "params":
                    assert dims[1].dim_value == cfg.num_params
            assert f"multiples of S={cfg.S}" in m.graph.doc_string


def test_spatial_mlp_node_and_function(case):
    _, cfg, _, bundle = case
    for prec in ("fp32", "fp16"):
        for g in ("pixelwise", "asap"):
            m = onnx.load(str(bundle.file(g, prec)))
            nodes = [n for n in m.graph.node if n.op_type == "SpatialMLP"]
            assert len(nodes) == 1, "exactly one SpatialMLP node"
            node = nodes[0]
            assert node.domain == "asap"
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_namespace"] == b"asap"
            assert attrs["tile_size"] == cfg.S and attrs["label_count"] == cfg.n_label_channels
            assert list(attrs["channels"]) == cfg.mlp_channels and attrs["depth"] == len(cfg.mlp_channels) - 1
            # INT32 ids in via Cast (from the uint8 input), float RGB out
            producers = {o: n for n in m.graph.node for o in n.output}
            ids_src = node.input[0]
            while producers[ids_src].op_type == "Where":  # don't-care mapping stays INT32
                ids_src = producers[ids_src].input[2]
            cast = producers[ids_src]
            assert cast.op_type == "Cast" and cast.input[0] == "labels"
            assert onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.INT32
            inferred = onnx.shape_inference.infer_shapes(m)
            types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
            want = onnx.TensorProto.FLOAT if prec == "fp32" else onnx.TensorProto.FLOAT16
            assert types[node.output[0]] == want
            # the model-local function of the same name, standard ops only
            funcs = [f for f in m.functions if f.name == "SpatialMLP" and f.domain == "asap"]
            assert len(funcs) == 1
            assert all(n.domain in ("", "ai.onnx") for n in funcs[0].node)
            ops = {n.op_type for n in funcs[0].node}
            assert {"Gather", "MatMul", "Tanh", "LeakyRelu"} <= ops and "Conv" not in ops


def test_fp16_files_keep_io_and_fragile_ops_in_fp32(case):
    _, cfg, _, bundle = case
    for g in graphs.GRAPH_NAMES:
        m32 = onnx.load(str(bundle.file(g, "fp32")))
        m16 = onnx.load(str(bundle.file(g, "fp16")))
        io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in [*m.graph.input, *m.graph.output]]  # noqa: E731
        assert io(m16) == io(m32)
        conv_w = [t for t in m16.graph.initializer if t.name.endswith(".0.weight")]
        assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in conv_w)
        inferred = onnx.shape_inference.infer_shapes(m16)
        types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
        for n in m16.graph.node:
            if n.op_type == "InstanceNormalization" or n.name in graphs.FP32_NODES_FOR_FP16:
                assert types.get(n.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, n.name


def test_export_is_deterministic(case, tmp_path):
    name, _, model, bundle = case
    again = export_model(model, tmp_path / "again").path
    for f in sorted(p.name for p in bundle.path.iterdir()):
        assert (again / f).read_bytes() == (bundle.path / f).read_bytes(), f


def test_unknown_module_is_refused():
    cfg = CONFIGS["plain_s32"]
    model = random_generator(cfg)
    model.lowres_stream.model[1] = torch.nn.GELU()
    with pytest.raises(graphs.ExportError, match=r"lowres_stream\.model\.1: module GELU"):
        graphs.build_graph(model, "predictor")


def test_file_names():
    assert file_name("asap", "fp32") == "asap.onnx" and file_name("asap", "fp16") == "asap.fp16.onnx"
