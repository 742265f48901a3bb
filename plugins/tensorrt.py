"""The `asap::SpatialMLP` TensorRT plugin (IPluginV3; name, namespace and version from
plugins/spec.py) and its creator, for full TensorRT (`tensorrt` 10.x/11.x) and TensorRT-RTX
(`tensorrt_rtx`): the same class body is built for whichever module is given (`plugin_classes(trt)`).

Importing this module changes nothing: `register(trt)` registers the creator with `trt`'s plugin
registry (idempotent, thread-safe); whoever parses or deserializes an engine calls it first (the
engine builder, the TensorRT runner, tests).

What the plugin does is in plugins/plugin_core.py (no TensorRT there): this file maps TensorRT's
types and descriptors onto it. Three methods must never raise (TensorRT segfaults, aborts, or
silently drops the fields otherwise): `clone`, `get_capability_interface` and
`get_fields_to_serialize` only copy or return prepared objects.

Kernels: the ONNX parser passes only the node's attributes, so a parsed plugin has no kernels.
The engine builder (engines/build.py) compiles the kernels for the bundle's config and target
architectures and hands the pack to the plugins of the network it just parsed
(`attach_kernels(trt, network, pack)`); each plugin serializes it with its fields, so the engine
carries its kernels. The pack travels with the plugin instance, never through the creator or a
module global: two builds in one process cannot see each other's packs.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from asap_deploy.errors import KernelError

from . import plugin_core as core
from .plugin_core import KernelPack, SpatialMLPCore
from .spec import KERNELS_FIELD, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

# Per TensorRT module: the classes built for it, and its registered creator (kept alive: the
# registry holds a raw pointer). Registration records, no hand-off between callers.
_CLASSES: dict[str, tuple[type, type]] = {}
_CREATORS: dict[str, Any] = {}
_LOCK = threading.RLock()  # reentrant: register() builds the classes while holding it


def _dtype_maps(trt):
    to_name = {trt.DataType.FLOAT: "fp32", trt.DataType.HALF: "fp16", trt.DataType.INT32: "int32"}
    return to_name, {v: k for k, v in to_name.items()}


def _field_type(trt, kind: str):
    return getattr(trt.PluginFieldType, kind)


def plugin_classes(trt) -> tuple[type, type]:
    """(SpatialMLPPlugin, SpatialMLPCreator) for the module `trt` (tensorrt or tensorrt_rtx)."""
    key = trt.__name__
    with _LOCK:
        if key in _CLASSES:
            return _CLASSES[key]
        to_name, from_name = _dtype_maps(trt)

        def make_fields(arrays: dict[str, np.ndarray]):
            # PluginField keeps a raw pointer to the array's data: the caller must keep `arrays` alive
            return trt.PluginFieldCollection([trt.PluginField(n, arrays[n], _field_type(trt, core.FIELDS[n][0]))
                                              for n in core.FIELD_NAMES])

        class SpatialMLPPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
            """asap::SpatialMLP: ids INT32 (N,H,W) + params (N,P,H/S,W/S) -> rgb (N,H,W,C), C = channels[-1]."""

            def __init__(self, state: SpatialMLPCore):
                trt.IPluginV3.__init__(self)
                trt.IPluginV3OneCore.__init__(self)
                trt.IPluginV3OneBuild.__init__(self)
                trt.IPluginV3OneRuntime.__init__(self)
                self.num_outputs = 1
                self.plugin_name = PLUGIN_NAME
                self.plugin_namespace = PLUGIN_NAMESPACE
                self.plugin_version = PLUGIN_VERSION
                self._prepare(state)
                self._dims: tuple[int, int, int] | None = None
                self._types: tuple[str, str] | None = None

            def _prepare(self, state: SpatialMLPCore) -> None:
                self.state = state
                self._arrays = state.field_arrays()  # referenced by the fields' raw pointers: keep alive
                self._fields = make_fields(self._arrays)  # prepared: serialization cannot fail

            def set_kernels(self, pack: KernelPack | bytes) -> None:
                """This instance (and its clones) will carry and serialize `pack` (the engine builder
                calls it, through `attach_kernels`, before building)."""
                if isinstance(pack, KernelPack):
                    self._prepare(SpatialMLPCore(self.state.attrs, pack=pack))
                else:
                    self._prepare(SpatialMLPCore(self.state.attrs, pack_bytes=bytes(pack)))

            # -- never raise ------------------------------------------------------------------------
            def get_capability_interface(self, type):  # noqa: A002 - TensorRT's argument name
                return self

            def clone(self):
                c = SpatialMLPPlugin.__new__(SpatialMLPPlugin)
                SpatialMLPPlugin.__init__(c, self.state.clone())
                c._dims, c._types = self._dims, self._types
                return c

            def get_fields_to_serialize(self):
                return self._fields

            # -- build ------------------------------------------------------------------------------
            def get_output_data_types(self, input_types):
                return [input_types[1]]

            def get_output_shapes(self, inputs, shape_inputs, expr_builder):
                # (N, H, W) of the ids where the params agree ((N, P, H/S, W/S)), else 0: a mismatch
                # that reached enqueue (which refuses it) would find an empty output, never a short one
                ids, params = inputs[0], inputs[1]
                op = trt.DimensionOperation
                s = expr_builder.constant(int(self.state.attrs["tile_size"]))
                out = trt.DimsExprs(4)
                for i, p_dim in ((0, params[0]), (1, expr_builder.operation(op.PROD, params[2], s)),
                                 (2, expr_builder.operation(op.PROD, params[3], s))):
                    same = expr_builder.operation(op.EQUAL, ids[i], p_dim)
                    out[i] = expr_builder.operation(op.PROD, ids[i], same)
                out[3] = expr_builder.constant(int(self.state.attrs["channels"][-1]))
                return [out]

            def supports_format_combination(self, pos, in_out, num_inputs):
                descs = [d.desc for d in in_out]
                names = [to_name.get(d.type) for d in descs]
                linear = [d.format == trt.TensorFormat.LINEAR for d in descs]
                return core.supported_combination(pos, names, linear, self.state.available())

            def configure_plugin(self, inp, out):
                # build time: a profile no shape of which the kernel can run is refused (-1 to TensorRT)
                core.check_shape_ranges((inp[0].min, inp[0].max), (inp[1].min, inp[1].max), self.state.attrs)

            def get_valid_tactics(self):
                return []

            def get_workspace_size(self, inp, out):
                return 0

            # -- runtime ----------------------------------------------------------------------------
            def set_tactic(self, tactic):
                pass

            def on_shape_change(self, inp, out):
                # run time: ids, params and rgb must agree before enqueue (raising fails the execution)
                self._dims = core.check_shapes(inp[0].dims, inp[1].dims, self.state.attrs, out[0].dims)
                self._types = (to_name.get(inp[1].type), to_name.get(out[0].type))

            def attach_to_context(self, context):
                return self.clone()

            def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
                core.enqueue_from_descs(self.state, input_desc, output_desc, inputs, outputs, stream, to_name.get)

        class SpatialMLPCreator(trt.IPluginCreatorV3One):
            def __init__(self):
                trt.IPluginCreatorV3One.__init__(self)
                self.name = PLUGIN_NAME
                self.plugin_namespace = PLUGIN_NAMESPACE
                self.plugin_version = PLUGIN_VERSION
                self._empty = {n: np.zeros(0, dtype=core.FIELDS[n][1]) for n in core.FIELD_NAMES}  # kept alive
                self.field_names = make_fields(self._empty)

            def create_plugin(self, name, field_collection, phase):
                # a plugin parsed from ONNX has no `kernels` field: attach_kernels gives it its pack
                values = {f.name: np.asarray(f.data) for f in field_collection if f.name in core.FIELDS}
                blob = values.pop(KERNELS_FIELD, np.zeros(0, np.int8))
                blob = np.ascontiguousarray(blob).view(np.uint8).tobytes() if blob.size else b""
                return SpatialMLPPlugin(SpatialMLPCore(values, pack_bytes=blob))

        _CLASSES[key] = (SpatialMLPPlugin, SpatialMLPCreator)
        return _CLASSES[key]


def register(trt):
    """Register the SpatialMLP creator with `trt`'s plugin registry; returns it. Idempotent and
    thread-safe: one creator per TensorRT module, however many callers and threads ask."""
    key = trt.__name__
    with _LOCK:  # held throughout: two threads must not both register (and one creator be freed)
        if key in _CREATORS:
            return _CREATORS[key]
        _, creator_cls = plugin_classes(trt)
        creator = creator_cls()
        registry = trt.get_plugin_registry()
        ok = registry.register_creator(creator, PLUGIN_NAMESPACE)
        if ok is False and registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            raise KernelError(f"{trt.__name__}: the plugin registry refused the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} "
                              f"creator")
        _CREATORS[key] = creator
        return creator


def attach_kernels(trt, network, pack: KernelPack | bytes) -> list[str]:
    """Give `pack` to every SpatialMLP plugin of a parsed `network` that has no kernels yet; each
    serializes it with its fields. Returns the names of those layers."""
    plugin_cls, _ = plugin_classes(trt)
    blob = pack.to_bytes() if isinstance(pack, KernelPack) else bytes(pack)
    names = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type != trt.LayerType.PLUGIN_V3:
            continue
        layer.__class__ = trt.IPluginV3Layer  # get_layer hands out the base ILayer: downcast to reach .plugin
        plugin = layer.plugin
        if isinstance(plugin, plugin_cls) and not plugin.state.pack_bytes:
            plugin.set_kernels(blob)
            names.append(layer.name)
    return names


def fields_of(plugin) -> dict[str, np.ndarray]:
    """Serialized fields of a plugin as name -> numpy array (what the engine stores)."""
    return {f.name: np.array(f.data) for f in plugin.get_fields_to_serialize()}
