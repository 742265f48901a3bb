"""The SpatialMLP contract (plugins/spec.py) ties its readers together: the ONNX node the exporter
writes, the TensorRT creator the parser looks up with that node, the plugin's fields, the kernel's
limits and slope, and the model's slope. Bumping one side alone (say the plugin version in the
creator but not in the node) fails here, not on a GPU at engine build time."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from asap_deploy import config
from asap_deploy.config import ModelConfig
from asap_deploy.export import graphs
from asap_deploy.plugins import plugin_core, spec
from asap_deploy.random_model import random_generator

CFG = ModelConfig(label_nc=5, contain_dontcare_label=True, crop_size=256, learned_ds_factor=8,
                  lr_width=8, lr_max_width=8, lr_depth=1, hr_width=16, hr_depth=3)  # S=16, tiny MLP


@pytest.fixture(scope="module")
def pixelwise():
    return graphs.build_graph(random_generator(CFG, 0), "pixelwise")


def _node(model):
    (node,) = [n for n in model.graph.node if n.op_type == spec.OP_NAME]
    return node, {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_exported_node_follows_the_contract(pixelwise):
    node, attrs = _node(pixelwise)
    assert node.domain == spec.DOMAIN
    assert attrs.pop(spec.NAMESPACE_ATTR).decode() == spec.PLUGIN_NAMESPACE
    assert attrs.pop(spec.VERSION_ATTR).decode() == spec.PLUGIN_VERSION
    assert sorted(attrs) == sorted(spec.ATTRIBUTE_NAMES)  # nothing more, nothing less than the plugin's fields
    assert np.float32(attrs["leaky_slope"]) == np.float32(spec.LEAKY_SLOPE)
    assert plugin_core.normalize_attributes(attrs)["channels"] == list(CFG.mlp_channels)
    (fn,) = pixelwise.functions
    assert (fn.domain, fn.name) == (spec.DOMAIN, spec.OP_NAME)
    assert sorted(fn.attribute) == sorted(spec.node_attributes(CFG))
    alphas = {helper.get_attribute_value(a) for n in fn.node if n.op_type == "LeakyRelu" for a in n.attribute}
    assert alphas == {np.float32(spec.LEAKY_SLOPE)}  # the ONNX Runtime body uses the same slope
    assert {o.domain: o.version for o in pixelwise.opset_import}[spec.DOMAIN] == 1


def test_plugin_fields_are_the_contract_attributes():
    assert plugin_core.FIELD_NAMES == (*spec.ATTRIBUTE_NAMES, spec.KERNELS_FIELD)
    assert set(spec.node_attributes(CFG)) == {spec.NAMESPACE_ATTR, spec.VERSION_ATTR, *spec.ATTRIBUTE_NAMES}


def test_one_slope_and_one_hidden_limit():
    assert spec.LEAKY_SLOPE is config.LEAKY_SLOPE  # the core owns it; the contract re-exports it
    kernel = pytest.importorskip("asap_deploy.plugins.kernel", reason="triton not installed")
    assert kernel.LEAKY_SLOPE.value == spec.LEAKY_SLOPE
    src = Path(kernel.__file__).read_text()
    branches = sorted({int(k) for k in re.findall(r"if N_HIDDEN >= (\d+):", src)})  # weight loads + layers
    assert branches == list(range(1, spec.MAX_HIDDEN + 1)), "the kernel unrolls a different number of hidden layers"
    assert not re.search(r"0\.01\b", src), "a literal slope in the kernel: use LEAKY_SLOPE"


def test_kernel_spec_refuses_beyond_the_hidden_limit():
    from asap_deploy.errors import ConfigError

    deep = ModelConfig(label_nc=5, crop_size=256, learned_ds_factor=8, hr_width=16, hr_depth=spec.MAX_HIDDEN + 3)
    with pytest.raises(ConfigError, match=f"at most {spec.MAX_HIDDEN} hidden"):
        spec.kernel_spec(deep)
    assert spec.kernel_spec(CFG).N_HIDDEN == CFG.hr_depth - 2


def test_node_selects_the_registered_creator(pixelwise):
    """What TensorRT's ONNX parser does: look up the creator by the node's op type, plugin_version and
    plugin_namespace. The creator registered by plugins/tensorrt.py must be the one found."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 not installed (pip install 'asap-deploy[rtx]')")
    from asap_deploy.plugins.tensorrt import register

    creator = register(trt)
    assert (creator.name, creator.plugin_namespace, creator.plugin_version) == (
        spec.PLUGIN_NAME, spec.PLUGIN_NAMESPACE, spec.PLUGIN_VERSION)
    node, attrs = _node(pixelwise)
    namespace, version = attrs[spec.NAMESPACE_ATTR].decode(), attrs[spec.VERSION_ATTR].decode()
    found = trt.get_plugin_registry().get_creator(node.op_type, version, namespace)
    assert found is not None, f"the node asks for {namespace}::{node.op_type} v{version}: no such creator registered"
    assert (found.name, found.plugin_version, found.plugin_namespace) == (
        creator.name, creator.plugin_version, creator.plugin_namespace)
    assert [f.name for f in creator.field_names] == list(plugin_core.FIELD_NAMES)
    arrays = plugin_core.field_arrays(plugin_core.normalize_attributes(attrs), None)
    fields = trt.PluginFieldCollection([trt.PluginField(n, arrays[n], getattr(trt.PluginFieldType,
                                                                               plugin_core.FIELDS[n][0]))
                                        for n in plugin_core.FIELD_NAMES])
    p = creator.create_plugin(node.name, fields, trt.TensorRTPhase.BUILD)
    assert (p.plugin_name, p.plugin_namespace, p.plugin_version) == (node.op_type, namespace, version)
