"""The SpatialMLP contract, written once: the ONNX node, the TensorRT plugin, the kernel's limits
and compile-time constants.

Read by the ONNX writer (export/graphs.py, export/bundle.py), the plugin (plugin_core.py,
tensorrt.py), the kernel (kernel.py), the torch op (torch_op.py), the AOT compiler (aot.py) and
the engine builder (engines/build.py). It needs only the core, so export/ may import it (and no
other module of plugins/). Bump PLUGIN_VERSION whenever the fields or their meaning change:
the ONNX node, the creator and every engine sidecar read it from here (tests/test_spec.py).

The leaky slope is part of the model (ASAP-Net's per-pixel MLP), not of the plugin, so its one
home is the core (`asap_deploy.config.LEAKY_SLOPE`: the core imports nothing of ours, the model
needs it); it is re-exported here because the kernel and the plugin's `leaky_slope` field
promise exactly that value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from asap_deploy.config import LEAKY_SLOPE, ModelConfig
from asap_deploy.errors import ConfigError, UsageError

# ---- the ONNX node and the TensorRT plugin it maps to ------------------------------------------
OP_NAME = "SpatialMLP"  # ONNX op_type, and the plugin creator's name (TensorRT matches them)
DOMAIN = "asap"  # the node's ONNX domain
PLUGIN_NAME = OP_NAME
PLUGIN_NAMESPACE = "asap"
PLUGIN_VERSION = "1"
# Node attributes TensorRT's ONNX parser reads to choose the creator (not plugin fields).
NAMESPACE_ATTR = "plugin_namespace"
VERSION_ATTR = "plugin_version"
# Attribute name -> kind, in the order of the plugin's fields ("ints": a list).
ATTRIBUTES: dict[str, str] = {
    "tile_size": "int", "label_count": "int", "pe_channels": "int", "depth": "int", "num_params": "int",
    "channels": "ints", "leaky_slope": "float",
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
KERNELS_FIELD = "kernels"  # the plugin's last field: the kernel pack (INT8); never an ONNX attribute


def node_attributes(cfg: ModelConfig) -> dict[str, Any]:
    """Attributes of the SpatialMLP node for `cfg`: everything a kernel needs to run it."""
    return {
        NAMESPACE_ATTR: PLUGIN_NAMESPACE,
        VERSION_ATTR: PLUGIN_VERSION,
        "tile_size": cfg.S,
        "label_count": cfg.n_label_channels,
        "pe_channels": cfg.pe_channels,
        "channels": list(cfg.mlp_channels),  # [c0, hidden..., 3]; depth = len(channels) - 1
        "depth": len(cfg.mlp_channels) - 1,
        "num_params": cfg.num_params,
        "leaky_slope": LEAKY_SLOPE,
    }


# ---- the kernel's limits and compile-time constants ---------------------------------------------
MAX_HIDDEN = 4  # hidden (HID -> HID) layers the kernel unrolls: hr_depth <= MAX_HIDDEN + 2
DEFAULT_BLOCK_P = 128  # pixels per dot block
DEFAULT_ITERS = 4  # dot blocks per program (parameters loaded once for BLOCK_P*ITERS pixels)
DEFAULT_NUM_WARPS = 4


@dataclass(frozen=True)
class KernelSpec:
    """Compile-time constants of one kernel variant (+ launch options)."""

    S: int  # noqa: N815
    LOG2S: int  # noqa: N815
    HID: int  # noqa: N815
    N_HIDDEN: int  # noqa: N815
    OUT: int  # noqa: N815
    OUT_PAD: int  # noqa: N815
    PE_PAD: int  # noqa: N815
    EXTRA: int  # noqa: N815
    BLOCK_P: int  # noqa: N815
    ITERS: int  # noqa: N815
    OUT_U8: bool = False  # noqa: N815
    RELOAD: bool = False  # noqa: N815 - re-read the hidden weights per block (less shared memory, aot.py)
    num_warps: int = DEFAULT_NUM_WARPS
    num_stages: int = 1

    @property
    def pixels_per_program(self) -> int:
        return self.BLOCK_P * self.ITERS

    @property
    def programs_per_tile(self) -> int:
        return (self.S * self.S) // self.pixels_per_program

    def constexprs(self) -> dict:
        d = asdict(self)
        d.pop("num_warps"), d.pop("num_stages")
        return d

    def grid(self, n: int, height: int, width: int) -> tuple[int, int, int]:
        """Launch grid rule: one program per BLOCK_P*ITERS pixels of one tile."""
        return (n * (height // self.S) * (width // self.S) * self.programs_per_tile, 1, 1)

    def num_params(self, n_lab: int) -> int:
        c0 = n_lab + self.EXTRA + 4 * self.LOG2S
        return (c0 + 1) * self.HID + self.N_HIDDEN * (self.HID + 1) * self.HID + (self.HID + 1) * self.OUT


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(v, 1)))))


def kernel_spec(cfg: ModelConfig, *, extra_channels: int = 0, out_u8: bool = False,
                block_p: int | None = None, iters: int | None = None,
                num_warps: int = DEFAULT_NUM_WARPS) -> KernelSpec:
    """The kernel variant for `cfg`, or ConfigError naming the field the kernel cannot take."""
    S = cfg.S  # noqa: N806
    if S < 4:
        raise ConfigError(f"the fused kernel needs S >= 4 (a tile of >= 16 pixels for its dots); this config has "
                          f"S = {S} from crop_size={cfg.crop_size}, aspect_ratio={cfg.aspect_ratio}")
    hid = cfg.hr_width
    if hid < 16 or hid > 128 or hid & (hid - 1):
        raise ConfigError(f"the fused kernel needs hr_width to be a power of two in 16..128 (tl.dot tiles, "
                          f"registers); this config has hr_width={hid}: use the torch per-tile path")
    n_hidden = cfg.hr_depth - 2
    if n_hidden > MAX_HIDDEN:
        raise ConfigError(f"the fused kernel unrolls at most {MAX_HIDDEN} hidden layers (hr_depth <= "
                          f"{MAX_HIDDEN + 2}); this config has hr_depth={cfg.hr_depth}")
    if cfg.output_nc > 16:
        raise ConfigError(f"the fused kernel supports output_nc <= 16; this config has output_nc={cfg.output_nc}")
    c0 = cfg.mlp_channels[0]
    if c0 != cfg.n_label_channels + cfg.pe_channels:
        raise ConfigError(
            f"the pixelwise input of this config is not [one-hot labels, PE]: mlp_channels[0]={c0} but "
            f"label_nc/contain_dontcare_label give {cfg.n_label_channels} label channels and S gives "
            f"{cfg.pe_channels} PE channels; pass the dense inputs as `extra` (general first layer)")
    if extra_channels < 0:
        raise UsageError(f"extra_channels must be >= 0 (got {extra_channels})")
    bp = min(block_p or DEFAULT_BLOCK_P, S * S)
    if bp < 16 or bp & (bp - 1):
        raise UsageError(f"block_p must be a power of two >= 16 (got {bp})")
    it = max(1, min(iters or DEFAULT_ITERS, (S * S) // bp))
    while (S * S) % (bp * it):
        it -= 1
    return KernelSpec(S=S, LOG2S=cfg.log2_S, HID=hid, N_HIDDEN=n_hidden, OUT=cfg.output_nc,
                      OUT_PAD=_pow2_at_least(cfg.output_nc, 16), PE_PAD=_pow2_at_least(cfg.pe_channels, 16),
                      EXTRA=extra_channels, BLOCK_P=bp, ITERS=it, OUT_U8=out_u8, num_warps=num_warps)
