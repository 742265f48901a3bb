"""The SpatialMLP plugin without TensorRT: fields, kernel pack, shape/type rules and the enqueue path.

plugins/tensorrt.py wraps this in an IPluginV3 for `tensorrt` / `tensorrt_rtx`; a GPU harness
(benchmarks/gpu_plugin.py) drives `SpatialMLPCore.enqueue` directly with cuda-python pointers, so
the code TensorRT runs can be checked on a machine without TensorRT. Needs numpy only (plus
cuda-python inside `enqueue`).

Fields (plugins/spec.py, PLUGIN_VERSION): the ONNX node's attributes (`spec.node_attributes`)
and `kernels`, an INT8 array holding a kernel pack: the AOT-compiled cubin + PTX of every
(architecture, params dtype, out dtype) variant with its JSON metadata (plugins/aot.py), so an
engine needs nothing but this small class and the CUDA driver at run time.

Kernel pack layout: b"ASAPKPK1", u32 little-endian header length, header JSON
{"schema": 1, "kernels": [{"meta": {...}, "cubin": [offset, size], "ptx": [offset, size]}]},
then the images (offsets relative to the end of the header).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from asap_deploy.config import padded_size
from asap_deploy.errors import KernelError

from .spec import ATTRIBUTE_NAMES, ATTRIBUTES, KERNELS_FIELD, LEAKY_SLOPE

# field name -> (kind, numpy dtype): the contract's attributes (plugins/spec.py), then the kernel
# pack; kinds map to trt.PluginFieldType in plugins/tensorrt.py
_KINDS = {"int": ("INT32", np.int32), "ints": ("INT32", np.int32), "float": ("FLOAT32", np.float32)}
INT_FIELDS = tuple(n for n, k in ATTRIBUTES.items() if k == "int")
FIELDS: dict[str, tuple[str, Any]] = {
    **{n: _KINDS[k] for n, k in ATTRIBUTES.items()},
    KERNELS_FIELD: ("INT8", np.int8),
}
FIELD_NAMES = tuple(FIELDS)

DTYPES = ("fp32", "fp16")  # params / float output element types the kernel takes
_MAGIC = b"ASAPKPK1"
PACK_SCHEMA = 1


# ---- kernel pack -------------------------------------------------------------------------------
@dataclass
class PackedKernel:
    meta: dict
    cubin: bytes
    ptx: bytes  # text, without a trailing NUL

    @property
    def cc(self) -> int:
        return int(self.meta["cc"])

    @property
    def params_dtype(self) -> str:
        return self.meta["variant"]["params_dtype"]

    @property
    def out_dtype(self) -> str:
        return self.meta["variant"]["out_dtype"]

    @property
    def arch_specific(self) -> bool:
        """sm_90a / sm_100a style targets run only on exactly that architecture."""
        return str(self.meta.get("ptx_target") or "").endswith("a")


@dataclass
class KernelPack:
    kernels: list[PackedKernel] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        entries, blobs, off = [], [], 0
        for k in self.kernels:
            ent = {"meta": k.meta}
            for key, data in (("cubin", k.cubin), ("ptx", k.ptx)):
                ent[key] = [off, len(data)]
                blobs.append(data)
                off += len(data)
            entries.append(ent)
        header = json.dumps({"schema": PACK_SCHEMA, "kernels": entries}, sort_keys=True).encode()
        return _MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> "KernelPack":
        data = bytes(data)
        if not data:
            return cls()
        if data[:8] != _MAGIC or len(data) < 12:
            raise KernelError("the plugin's `kernels` field is not an asap kernel pack (bad magic)")
        (n,) = struct.unpack("<I", data[8:12])
        try:
            header = json.loads(data[12:12 + n].decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KernelError(f"the plugin's kernel pack header is unreadable: {exc}") from exc
        if header.get("schema") != PACK_SCHEMA:
            raise KernelError(f"kernel pack schema {header.get('schema')} is not {PACK_SCHEMA}: rebuild the engine")
        body = data[12 + n:]
        out = []
        for ent in header["kernels"]:
            (co, cs), (po, ps) = ent["cubin"], ent["ptx"]
            if co + cs > len(body) or po + ps > len(body):
                raise KernelError("the plugin's kernel pack is truncated: rebuild the engine")
            k = PackedKernel(ent["meta"], body[co:co + cs], body[po:po + ps])
            sha = k.meta.get("sha256", {})
            if sha and (hashlib.sha256(k.cubin).hexdigest() != sha.get("cubin")
                        or hashlib.sha256(k.ptx).hexdigest() != sha.get("ptx")):
                raise KernelError(f"kernel {k.meta.get('kernel_name')} (sm_{k.cc}) in the plugin's fields does not "
                                  f"match its recorded sha256: the engine is damaged; rebuild it")
            out.append(k)
        return cls(out)

    def archs(self) -> list[int]:
        return sorted({k.cc for k in self.kernels})

    def dtypes(self) -> list[tuple[str, str]]:
        return sorted({(k.params_dtype, k.out_dtype) for k in self.kernels})

    def select(self, cc: int, params_dtype: str, out_dtype: str) -> tuple[PackedKernel, str]:
        """(kernel, 'cubin'|'ptx') for a GPU of compute capability `cc`: the exact cubin, else a
        cubin of the same major and lower minor (binary compatible), else PTX of an older target
        (JIT by the driver); KernelError naming what the engine holds otherwise."""
        cands = [k for k in self.kernels if k.params_dtype == params_dtype and k.out_dtype == out_dtype]
        exact = [k for k in cands if k.cc == cc]
        if exact:
            return exact[0], "cubin"
        compat = sorted((k for k in cands if k.cc // 10 == cc // 10 and k.cc < cc and not k.arch_specific),
                        key=lambda k: -k.cc)
        if compat:
            return compat[0], "cubin"
        jit = sorted((k for k in cands if k.cc < cc and not k.arch_specific), key=lambda k: -k.cc)
        if jit:
            return jit[0], "ptx"
        have = ", ".join(f"sm_{a}" for a in self.archs()) or "none"
        raise KernelError(f"the engine's SpatialMLP plugin has no kernel for this GPU (sm_{cc}, params {params_dtype}, "
                          f"out {out_dtype}); it holds {have} ({', '.join('/'.join(d) for d in self.dtypes()) or '-'}). "
                          f"Rebuild it with `asap build-engine ... --arch sm_{cc}`")


def pack_from_metadata(metas: Sequence[Mapping], folder) -> KernelPack:
    """A pack from aot.compile_variant metadata dicts whose files lie in `folder` (plain names inside
    it, checked against the sha256 the metadata records)."""
    from .aot import check_metadata, read_images

    out = []
    for m in metas:
        m = check_metadata(dict(m), folder)
        out.append(PackedKernel(m, *read_images(m, folder)))
    return KernelPack(out)


# ---- attributes, shapes, types -----------------------------------------------------------------
def normalize_attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    """Field/attribute values (numpy arrays or python) -> plain python; KernelError naming a
    missing or inconsistent one."""
    missing = [n for n in ATTRIBUTE_NAMES if n not in values]
    if missing:
        raise KernelError(f"SpatialMLP plugin: missing field(s) {', '.join(missing)} (the ONNX node must carry the "
                          f"attributes of plugins/spec.py node_attributes)")
    a: dict[str, Any] = {}
    for n in INT_FIELDS:
        a[n] = int(np.asarray(values[n]).reshape(-1)[0])
    a["channels"] = [int(v) for v in np.asarray(values["channels"]).reshape(-1)]
    a["leaky_slope"] = float(np.asarray(values["leaky_slope"], dtype=np.float32).reshape(-1)[0])
    ch = a["channels"]
    if len(ch) != a["depth"] + 1 or a["depth"] < 2:
        raise KernelError(f"SpatialMLP plugin: channels {ch} do not fit depth {a['depth']}")
    if ch[0] != a["label_count"] + a["pe_channels"]:
        raise KernelError(f"SpatialMLP plugin: channels[0]={ch[0]} is not label_count + pe_channels "
                          f"({a['label_count']} + {a['pe_channels']})")
    if len(set(ch[1:-1])) != 1:
        raise KernelError(f"SpatialMLP plugin: hidden widths {ch[1:-1]} differ; the kernel needs one width")
    if abs(a["leaky_slope"] - LEAKY_SLOPE) > 1e-7:
        raise KernelError(f"SpatialMLP plugin: leaky_slope {a['leaky_slope']} is not the kernel's {LEAKY_SLOPE}")
    return a


def field_arrays(attrs: Mapping[str, Any], pack: KernelPack | bytes | None) -> dict[str, np.ndarray]:
    """Field name -> numpy array, as they are serialized."""
    out = {n: np.array([attrs[n]], np.int32) for n in INT_FIELDS}
    out["channels"] = np.array(attrs["channels"], np.int32)
    out["leaky_slope"] = np.array([attrs["leaky_slope"]], np.float32)
    blob = pack.to_bytes() if isinstance(pack, KernelPack) else (pack or b"")
    out[KERNELS_FIELD] = np.frombuffer(blob, np.int8).copy() if blob else np.zeros(0, np.int8)
    return out


def output_shape(ids_shape: Sequence, out_channels: int) -> list:
    """(N, H, W) ids -> (N, H, W, OUT) RGB (entries may be symbolic: they are passed through)."""
    if len(ids_shape) != 3:
        raise KernelError(f"SpatialMLP: ids must be (N, H, W), got rank {len(ids_shape)}")
    return [ids_shape[0], ids_shape[1], ids_shape[2], out_channels]


def _dims(d) -> list[int]:
    return [int(d[i]) for i in range(len(d))]


def check_shapes(ids, params, attrs: Mapping[str, Any], out=None) -> tuple[int, int, int]:
    """(N, H, W) when ids is (N, H, W), params (N, P, H/S, W/S) with P = num_params and, if given,
    out (N, H, W, C): the kernel reads params and writes out at indices computed from the ids'
    (N, H, W), so any other combination would read or write out of bounds. KernelError naming the
    mismatch otherwise. Sizes are concrete (run time: on_shape_change, enqueue)."""
    ids, params = _dims(ids), _dims(params)
    S, P, C = attrs["tile_size"], attrs["num_params"], attrs["channels"][-1]  # noqa: N806
    if len(ids) != 3 or len(params) != 4:
        raise KernelError(f"SpatialMLP: ids must be (N, H, W) and params (N, P, H/S, W/S); got ranks "
                          f"{len(ids)} and {len(params)}")
    n, h, w = ids
    if padded_size(h, w, S) != (h, w):
        raise KernelError(f"SpatialMLP: ids {h}x{w} is not a multiple of S={S}")
    want = [n, P, h // S, w // S]
    if params != want:
        raise KernelError(f"SpatialMLP: params has shape {tuple(params)}, but ids {tuple(ids)} need "
                          f"(N, P, H/S, W/S) = {tuple(want)} (P = num_params, S = {S}); the kernel would read "
                          f"outside the parameter grid")
    if out is not None and _dims(out) != [n, h, w, C]:
        raise KernelError(f"SpatialMLP: rgb has shape {tuple(_dims(out))}, not (N, H, W, C) = {(n, h, w, C)}")
    return n, h, w


def check_shape_ranges(ids: tuple, params: tuple, attrs: Mapping[str, Any]) -> None:
    """Build time (configure_plugin): `ids` and `params` are (min, max) dims of the profile. KernelError
    when no shape of the profile can satisfy check_shapes: wrong ranks, a parameter count other than
    num_params, or an N / H / W range of the ids that the params' range cannot match."""
    (ids_lo, ids_hi), (p_lo, p_hi) = [(_dims(a), _dims(b)) for a, b in (ids, params)]
    S, P = attrs["tile_size"], attrs["num_params"]  # noqa: N806
    if len(ids_lo) != 3 or len(p_lo) != 4:
        raise KernelError(f"SpatialMLP: ids must be (N, H, W) and params (N, P, H/S, W/S); got ranks "
                          f"{len(ids_lo)} and {len(p_lo)}")
    if p_lo[1] != P or p_hi[1] != P:
        raise KernelError(f"SpatialMLP: params dimension 1 ranges {p_lo[1]}..{p_hi[1]}, but this plugin takes "
                          f"exactly num_params = {P} parameters per tile")
    for axis, i, j, scale in (("N", 0, 0, 1), ("H", 1, 2, S), ("W", 2, 3, S)):
        if ids_hi[i] < p_lo[j] * scale or ids_lo[i] > p_hi[j] * scale:
            raise KernelError(f"SpatialMLP: the profile's ids {axis} range {ids_lo[i]}..{ids_hi[i]} cannot match its "
                              f"params range {p_lo[j]}..{p_hi[j]} (x{scale}); tie the params profile to the labels' "
                              f"(N, P, H/S, W/S)")


def output_dtype(params_dtype: str) -> str:
    """The RGB output has the parameters' element type (as the ONNX function body: CastLike)."""
    return params_dtype


def supported_combination(pos: int, dtypes: Sequence[str | None], linear: Sequence[bool],
                          available: Sequence[tuple[str, str]] | None = None) -> bool:
    """Position `pos` of (ids, params, rgb): ids int32; params fp32/fp16; rgb = params' type; all
    linear (row-major). `available`: (params, out) dtype pairs the packed kernels provide (None:
    any the kernel can be compiled for). Positions after `pos` are not looked at."""
    if not linear[pos]:
        return False
    if pos == 0:
        return dtypes[0] == "int32"
    if pos == 1:
        return dtypes[1] in DTYPES and (available is None or any(p == dtypes[1] for p, _ in available))
    if pos == 2:
        return dtypes[2] == output_dtype(dtypes[1]) and (available is None or (dtypes[1], dtypes[2]) in available)
    return False


def launch_values(ids: int, params: int, out: int, n: int, h: int, w: int, attrs: Mapping[str, Any]) -> dict:
    """Kernel argument values for the plugin's tensors: params (N, P, H/S, W/S) and rgb (N, H, W, OUT),
    both dense row-major as TensorRT hands LINEAR tensors; ids are channel indices already (the
    graph maps 255 to the don't-care channel), so dontcare_ch = -1."""
    from .launcher import spatial_mlp_values

    S, P, C = attrs["tile_size"], attrs["num_params"], attrs["channels"][-1]  # noqa: N806
    hs, ws = h // S, w // S
    return spatial_mlp_values(ids=ids, params=params, out=out, N=n, H=h, W=w, S=S, n_lab=attrs["label_count"],
                              dontcare_ch=-1, params_strides=(P * hs * ws, hs * ws, ws, 1),
                              out_strides=(h * w * C, w * C, C, 1))


# ---- the enqueue path ----------------------------------------------------------------------------
class SpatialMLPCore:
    """State of one plugin instance: attributes + kernel pack; loads a kernel once per CUDA context."""

    def __init__(self, attrs: Mapping[str, Any], pack: KernelPack | None = None, pack_bytes: bytes | None = None):
        self.attrs = normalize_attributes(attrs)
        self._pack_bytes = pack_bytes if pack_bytes is not None else (pack.to_bytes() if pack else b"")
        self._pack = pack
        self._loaded: dict[tuple, Any] = {}  # (context, cc, params, out) -> (DriverKernel, how)

    @property
    def pack(self) -> KernelPack:
        if self._pack is None:
            self._pack = KernelPack.from_bytes(self._pack_bytes)
        return self._pack

    @property
    def pack_bytes(self) -> bytes:
        return self._pack_bytes

    def field_arrays(self) -> dict[str, np.ndarray]:
        return field_arrays(self.attrs, self._pack_bytes)

    def available(self) -> list[tuple[str, str]] | None:
        return self.pack.dtypes() if self._pack_bytes else None

    def clone(self) -> "SpatialMLPCore":
        c = SpatialMLPCore.__new__(SpatialMLPCore)
        c.attrs, c._pack_bytes, c._pack, c._loaded = dict(self.attrs), self._pack_bytes, self._pack, {}
        return c

    def kernel_for(self, params_dtype: str, out_dtype: str):
        """The DriverKernel for the current context's device (device 0's primary context when none
        is current), loaded once per context: the context is bound BEFORE the cache key is taken."""
        from .cuda_driver import check, driver
        from .launcher import DriverKernel, bind_context

        drv = driver()
        ctx, dev = bind_context(0)
        key = (ctx, dev, params_dtype, out_dtype)
        if key not in self._loaded:
            attr = drv.CUdevice_attribute
            major = check(drv, drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc")
            minor = check(drv, drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc")
            k, how = self.pack.select(int(major) * 10 + int(minor), params_dtype, out_dtype)
            image = k.cubin if how == "cubin" else k.ptx + b"\0"
            self._loaded[key] = (DriverKernel(k.meta, image, int(dev)).load(), how)
        return self._loaded[key]

    def enqueue(self, ids: int, params: int, out: int, n: int, h: int, w: int, params_dtype: str,
                out_dtype: str, stream: int) -> str:
        """Launch the fused kernel on `stream` (raw cudaStream_t) for device pointers of the three
        tensors; returns 'cubin' or 'ptx' (how the kernel was loaded)."""
        S = self.attrs["tile_size"]  # noqa: N806
        if padded_size(h, w, S) != (h, w):
            raise KernelError(f"SpatialMLP: image {h}x{w} is not a multiple of S={S}")
        if n * h * w == 0:
            return "empty"
        kernel, how = self.kernel_for(params_dtype, out_dtype)
        from .launcher import grid_for

        kernel.launch(grid_for(kernel.meta, N=n, H=h, W=w), launch_values(ids, params, out, n, h, w, self.attrs),
                      stream)
        return how


def enqueue_from_descs(state: SpatialMLPCore, input_desc, output_desc, inputs, outputs, stream, type_name) -> str:
    """What IPluginV3OneRuntime.enqueue does: descriptors (`.dims`, `.type`) + raw device pointers +
    raw stream -> a launch. `type_name` maps a descriptor's type to 'fp32'/'fp16'/'int32'.
    Shared by the TensorRT plugin and the GPU harness (benchmarks/gpu_plugin.py)."""
    n, h, w = check_shapes(input_desc[0].dims, input_desc[1].dims, state.attrs, output_desc[0].dims)
    if type_name(input_desc[0].type) != "int32":
        raise KernelError(f"SpatialMLP: ids must be int32, got {type_name(input_desc[0].type)}")
    return state.enqueue(int(inputs[0]), int(inputs[1]), int(outputs[0]), n, h, w, type_name(input_desc[1].type),
                         type_name(output_desc[0].type), int(stream))
