"""ModelConfig: every shape of an ASAP-Net generator, its presets, and inference from a checkpoint.

Pure Python (no torch; numpy only inside the array helpers): `asap inspect` and the
inference-only backends use it too. The size rule (H, W multiples of S; pad and crop) and the
label-id rule (range, don't care) live here and only here; every layer calls them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import CheckpointError, ConfigError, InputError

DONTCARE_ID = 255  # the id of "don't care" pixels in label maps (SPADE convention)
# Negative slope of the per-pixel MLP's hidden activations (fixed by ASAP-Net, not a config field).
# Its one home: the model, the graphs and the fused kernel (via plugins/spec.py) all read it here.
LEAKY_SLOPE = 0.01

# ---- limits on the model a config may describe (a config is untrusted input: it comes from
# checkpoints, bundle manifests and --config files). Checked by `ModelConfig.validate` from the
# config alone, before anything is allocated; see `ModelConfig.cost`.
# The published generator has ~83 M learned parameters (333 MB in fp32) and needs well under
# 1 GiB of activations at its training crop.
MAX_PARAMETERS = 400_000_000  # learned parameters of the low-res stream (1.6 GB in fp32)
MAX_ACTIVATION_BYTES = 16 * 2**30  # estimated peak of one no-grad fp32 forward, batch 1, at the crop
# Field ranges (the same as the bundle manifest's, export/bundle.py): generous for real models,
# small enough that the closed-form sizing below is cheap.
FIELD_RANGES: dict[str, tuple[int, int]] = {
    "label_nc": (1, 65535), "crop_size": (1, 1 << 16), "learned_ds_factor": (1, 1 << 16),
    "lr_width": (1, 1 << 16), "lr_max_width": (1, 1 << 16), "lr_depth": (0, 256),
    "hr_width": (1, 1 << 16), "hr_depth": (2, 256), "output_nc": (1, 64),
}
MAX_ASPECT_RATIO = 1024.0



# ---- the size rule, for callers that know only S (kernels, engine profiles) ------------------------
def padded_size(h: int, w: int, S: int) -> tuple[int, int]:  # noqa: N803
    """(h, w) rounded up to multiples of S: the size a label map is padded to (`pad_to_tiles`)."""
    return -(-h // S) * S, -(-w // S) * S


def pad_to_tiles(a, S: int):  # noqa: N803
    """numpy (H, W, ...) -> (H', W', ...) with H', W' = `padded_size(H, W, S)`: reflect padding at the
    bottom and right, so the top-left H x W is the input and `crop(out, H, W)` undoes it (edge
    padding where a side is 1 pixel: reflect needs two)."""
    import numpy as np

    h, w = a.shape[:2]
    ph, pw = padded_size(h, w, S)
    if (ph, pw) == (h, w):
        return a
    pad = [(0, ph - h), (0, pw - w)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad, mode="reflect" if min(h, w) > 1 else "edge")


def crop(a, h: int, w: int):
    """The top-left h x w of an (H', W', ...) array: undoes `pad_to_tiles` on its output."""
    return a[:h, :w]

@dataclass(frozen=True)
class ModelCost:
    """What one generator costs, from its config alone (`ModelConfig.cost`).

    `parameters`: learned parameters (the low-res stream; the pixelwise MLP's are predicted).
    `parameter_bytes`: their size in fp32. `activation_bytes`: an estimate of the peak of one
    no-grad fp32 forward of `batch` x `height` x `width` (the largest set of tensors alive at
    once, including conv workspaces): a bound to refuse absurd models with, not a measurement.
    """

    parameters: int
    parameter_bytes: int
    activation_bytes: int
    batch: int
    height: int
    width: int


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of an ASAP-Net generator (field names follow the authors' options).

    `contain_dontcare_label`: True adds one channel for id 255; False has none; None means
    "unknown" (a config inferred from an authors' checkpoint cannot tell "N classes + don't care"
    from "N+1 classes"): then `label_nc` counts every label channel and id 255 maps to the last one.
    """

    label_nc: int
    contain_dontcare_label: bool | None = False
    instance_edges: bool = False
    crop_size: int = 1024
    aspect_ratio: float = 1.0
    learned_ds_factor: int = 16
    lr_width: int = 64
    lr_max_width: int = 1024
    lr_depth: int = 7
    hr_width: int = 64
    hr_depth: int = 5
    reflection_pad: bool = False
    output_nc: int = 3

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def S(self) -> int:  # noqa: N802 - the paper's name
        """Total downsampling factor: pixels per tile side."""
        return int(self.crop_size // (16 * self.aspect_ratio))

    @property
    def log2_S(self) -> int:  # noqa: N802
        return int(round(math.log2(self.S)))

    @property
    def pre_downsample(self) -> int:
        """S1 = S / S2: the fixed tent pre-downsample factor (1 = none)."""
        return self.S // self.learned_ds_factor

    @property
    def n_label_channels(self) -> int:
        """Channels of the one-hot label encoding (the MLP's label inputs)."""
        return self.label_nc + (1 if self.contain_dontcare_label is True else 0)

    @property
    def n_lowres_inputs(self) -> int:
        return self.n_label_channels + (1 if self.instance_edges else 0)

    @property
    def pe_channels(self) -> int:
        return 4 * self.log2_S

    @property
    def mlp_channels(self) -> list[int]:
        return [self.n_label_channels + self.pe_channels] + [self.hr_width] * (self.hr_depth - 1) + [self.output_nc]

    @property
    def num_params(self) -> int:
        """Parameters per tile predicted by the low-res stream."""
        ch = self.mlp_channels
        return sum((ch[i] + 1) * ch[i + 1] for i in range(len(ch) - 1))

    def param_offsets(self) -> list[tuple[int, int, int, int]]:
        """Per MLP layer: (bias_start, weight_start, c_in, c_out) in the public layout
        `[bias (c_out) | weight (c_in*c_out, element i*c_out+o)]`."""
        out, idx = [], 0
        ch = self.mlp_channels
        for cin, cout in zip(ch[:-1], ch[1:]):
            out.append((idx, idx + cout, cin, cout))
            idx += cout + cin * cout
        return out

    def validate(self) -> None:
        """ConfigError unless every field has its type and range and the model it describes is
        within MAX_PARAMETERS / MAX_ACTIVATION_BYTES at its training crop (`check_cost`)."""
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"invalid model config: {msg}")

        for name, (lo, hi) in FIELD_RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise bad(f"{name} must be a whole number, got {str(v)[:40]!r} ({type(v).__name__})")
            object.__setattr__(self, name, int(v))  # numpy integers become plain ints
            v = int(v)
            if v < lo:
                raise bad(f"{name} must be >= {lo} (got {v})")
            if v > hi:
                raise bad(f"{name} must be <= {hi} (got {v})")
        for name in ("instance_edges", "reflection_pad"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false, got {str(getattr(self, name))[:40]!r}")
        if self.contain_dontcare_label is not None and not isinstance(self.contain_dontcare_label, bool):
            raise bad(f"contain_dontcare_label must be true, false or null, got {str(self.contain_dontcare_label)[:40]!r}")
        a = self.aspect_ratio
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a):
            raise bad(f"aspect_ratio must be a finite number, got {str(a)[:40]!r}")
        if a <= 0:
            raise bad(f"aspect_ratio must be > 0 (got {a})")
        if not 1 / MAX_ASPECT_RATIO <= a <= MAX_ASPECT_RATIO:
            raise bad(f"aspect_ratio must be in {1 / MAX_ASPECT_RATIO:g}..{MAX_ASPECT_RATIO:g} (got {a})")
        s2 = self.learned_ds_factor
        if s2 < 1 or s2 & (s2 - 1):
            raise bad(f"learned_ds_factor must be a power of two (got {s2})")
        s = self.S
        if s < 2 or s & (s - 1):
            raise bad(
                f"S = crop_size // (16 * aspect_ratio) = {self.crop_size} // (16 * {self.aspect_ratio}) = {s} "
                "must be a power of two >= 2"
            )
        if s < s2:
            raise bad(f"S = {s} is smaller than learned_ds_factor = {s2}; lower learned_ds_factor or raise crop_size")
        if min(self.crop_hw) < s:
            raise bad(f"the training crop ({self.crop_hw[0]}x{self.crop_hw[1]} from crop_size={self.crop_size}, "
                      f"aspect_ratio={self.aspect_ratio}) holds no whole {s}x{s} tile")
        self.check_cost()

    # ---- size of the model, from the config alone -------------------------------------------
    @property
    def crop_hw(self) -> tuple[int, int]:
        """(H, W) of the training crop, rounded down to multiples of S (the grid of `describe`)."""
        s = self.S
        return int(round(self.crop_size / self.aspect_ratio)) // s * s, self.crop_size // s * s

    # ---- the size rule: inputs are whole S x S tiles ----------------------------------------
    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) rounded up to multiples of S (what `pad_to_tiles` pads to)."""
        return padded_size(h, w, self.S)

    def fits_tiles(self, h: int, w: int) -> bool:
        """Whether an h x w label map is whole S x S tiles: h and w positive multiples of S."""
        return h > 0 and w > 0 and self.padded_size(h, w) == (h, w)

    def check_size(self, h: int, w: int, what: str = "image size") -> None:
        """InputError unless `fits_tiles(h, w)`: "{what} HxW (HxW) is not a positive multiple of S: pad it to ..."."""
        if not self.fits_tiles(h, w):
            ph, pw = self.padded_size(h, w)
            raise InputError(f"{what} {h}x{w} (HxW) is not a positive multiple of S={self.S}: pad it to {ph}x{pw}")

    def pad_to_tiles(self, a):
        """numpy (H, W, ...) -> reflect-padded at the bottom/right to `padded_size(H, W)`; `crop` undoes it."""
        return pad_to_tiles(a, self.S)

    def cost(self, height: int | None = None, width: int | None = None, batch: int = 1) -> ModelCost:
        """Parameters and estimated peak activation bytes of this generator for one no-grad fp32
        forward of `batch` label maps of `height` x `width` (default: the training crop).

        Closed-form arithmetic on the fields (nothing is allocated). The activation estimate
        adds, per stage, the tensors alive together in `model.ASAPNetGenerator.forward`: the
        label indices; the low-res input (full-resolution one-hot when S1 = 1, else the tent
        pass's tap tables); for each low-res conv its input, output and one sample's im2col
        workspace; in the pixelwise stage the parameter grid and its tile-major copy, the
        per-tile gather table, the encoding table, the chunk buffers and the output.
        """
        H, W = self.crop_hw if height is None or width is None else (int(height), int(width))  # noqa: N806
        B, S, s1 = int(batch), self.S, self.pre_downsample  # noqa: N806
        n_ds = self.learned_ds_factor.bit_length() - 1
        n_lab, n_in = self.n_label_channels, self.n_lowres_inputs
        w, wm, hw, c_out = self.lr_width, self.lr_max_width, self.hr_width, self.output_nc
        c0 = n_lab + self.pe_channels  # the MLP: c0 -> hw (hr_depth - 1 times) -> c_out, bias rows included
        P = (c0 + 1) * hw + (self.hr_depth - 2) * (hw + 1) * hw + (hw + 1) * c_out  # noqa: N806 (= num_params)
        f32, i64, px = 4, 8, B * H * W

        # learned parameters: first conv (+ IN affine), the stride-2 convs, the blocks, the 1x1
        layers = [(n_in, w, 1)] + [(w, wm if i == n_ds - 1 else w, 2) for i in range(n_ds)]
        wl = wm if n_ds else w
        if self.lr_depth:
            layers.append((wl, wl, 1))  # one block stands for all: same shapes, same peak
        params = (sum(9 * ci * co + 2 * co for ci, co, _ in layers) + (self.lr_depth - 1) * (9 * wl * wl + 2 * wl)
                  * (self.lr_depth > 0) + (wl + 1) * P)

        idx = 2 * i64 * px  # labels.long() and the channel indices
        h0, w0 = H // s1, W // s1
        lr_in = f32 * B * n_in * h0 * w0
        if s1 == 1:
            enc = f32 * px * n_lab + ((f32 + 1) * px + f32 * px * n_in if self.instance_edges else 0)
        else:  # tap classes (int64) + tap weights, horizontal pass and its padded copy, edges
            enc = (i64 + f32) * 2 * px + 2 * f32 * B * H * w0 * n_lab + lr_in + (4 * f32 * px if self.instance_edges else 0)
        peak_lr, h, wd = 0, h0, w0
        for ci, co, stride in layers:
            ho, wo = -(-h // stride), -(-wd // stride)
            peak_lr = max(peak_lr, f32 * (B * ci * h * wd + B * co * ho * wo + 9 * ci * ho * wo))
            h, wd = ho, wo
        tiles = B * (H // S) * (W // S)
        grid = f32 * tiles * P
        peak_lr = max(peak_lr, f32 * B * wl * h * wd + grid)
        chunk = max(4096, S * S) * 2  # pixels of one chunk of whole tiles (model.DEFAULT_CHUNK_PIXELS)
        pix = (2 * grid  # the grid and its tile-major copy
               + 2 * f32 * tiles * n_lab * (hw + 1)  # the gather table and the sum it is made of
               + S * S * (f32 * self.pe_channels + 40)  # the encoding table and its numpy temporaries
               + f32 * px * c_out  # the output
               + chunk * (3 * f32 * (max(hw, c_out) + 1) + i64 + f32 * c_out))  # chunk buffers
        acts = idx + max(enc, lr_in + peak_lr, pix, grid + 2 * f32 * px * c_out)
        return ModelCost(params, f32 * params, acts, B, H, W)

    def check_cost(self, height: int | None = None, width: int | None = None, batch: int = 1, *,
                   max_parameters: int | None = None, max_activation_bytes: int | None = None) -> ModelCost:
        """`cost(...)`, or ConfigError when the model has more than `max_parameters` learned
        parameters (default MAX_PARAMETERS) or needs more than `max_activation_bytes` (estimated;
        default MAX_ACTIVATION_BYTES) at that size."""
        max_parameters = MAX_PARAMETERS if max_parameters is None else max_parameters
        max_activation_bytes = MAX_ACTIVATION_BYTES if max_activation_bytes is None else max_activation_bytes
        c = self.cost(height, width, batch)
        if c.parameters > max_parameters:
            raise ConfigError(
                f"invalid model config: the model it describes is too large: {c.parameters:,} learned parameters "
                f"({_gib(c.parameter_bytes)} in fp32), the limit is {max_parameters:,} (the published generator has "
                f"~83 M); check lr_width={self.lr_width}, lr_max_width={self.lr_max_width}, lr_depth={self.lr_depth}, "
                f"label_nc={self.label_nc}, hr_width={self.hr_width}, hr_depth={self.hr_depth}")
        if c.activation_bytes > max_activation_bytes:
            where = "its training crop" if height is None or width is None else "the requested size"
            raise ConfigError(
                f"invalid model config: the model it describes needs about {_gib(c.activation_bytes)} of activations "
                f"for {c.batch} x {c.height} x {c.width} ({where}), the limit is {_gib(max_activation_bytes)}; "
                f"check crop_size={self.crop_size}, aspect_ratio={self.aspect_ratio}, label_nc={self.label_nc}, "
                f"widths lr {self.lr_width}/{self.lr_max_width}, hr {self.hr_width}")
        return c

    # ---- label ids ----------------------------------------------------------------------
    @property
    def accepts_dontcare_id(self) -> bool:
        """Whether id 255 is a valid label id (it maps to the last label channel)."""
        return self.contain_dontcare_label is not False and self.n_label_channels <= DONTCARE_ID

    @property
    def allowed_label_ids(self) -> str:
        """The valid ids in words, for error messages: "0..N-1" (+ " or 255 (don't care)")."""
        return f"0..{self.n_label_channels - 1}" + (f" or {DONTCARE_ID} (don't care)" if self.accepts_dontcare_id else "")

    def invalid_label_ids(self, ids):
        """Boolean mask over an integer array of label ids (numpy or torch): True where this model
        does not take the id."""
        bad = (ids < 0) | (ids >= self.n_label_channels)
        if self.accepts_dontcare_id:
            bad &= ids != DONTCARE_ID
        return bad

    def first_invalid_label_id(self, ids) -> tuple[int, int, int] | None:
        """(id, x, y) of the first id (C order) of an integer array (..., H, W) that this model does
        not take, or None. Two reductions when every id is in 0..n-1 (the common case: no
        full-size temporaries); the mask only when something is outside. `ids`: numpy, or a torch
        tensor (reduced on its device, copied to the host only when something is outside)."""
        import numpy as np

        if not isinstance(ids, np.ndarray) and hasattr(ids, "detach"):  # torch, without importing it
            if ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < self.n_label_channels):
                return None
            if not bool(self.invalid_label_ids(ids).any()):  # e.g. don't-care ids: decided on the device
                return None
            ids = ids.detach().cpu().numpy()
        a = np.asarray(ids)
        if a.size == 0:
            return None
        if a.dtype.kind == "u" or int(a.min()) >= 0:
            if int(a.max()) < self.n_label_channels:
                return None
        bad = self.invalid_label_ids(a.astype(np.int64, copy=False))
        if not bad.any():
            return None
        at = np.unravel_index(int(np.argmax(bad)), a.shape)
        y, x = (int(v) for v in at[-2:]) if a.ndim >= 2 else (0, int(at[-1]) if a.ndim else 0)
        return int(a[at]), x, y

    def check_label_ids(self, ids, what: str | None = None, at: str | None = "at x={x}, y={y}") -> None:
        """InputError naming the first id this model does not take: "[what: ]label id V [at x=X, y=Y]
        is out of range: this model takes ids ...". `at` formats the place (None: not named)."""
        found = self.first_invalid_label_id(ids)
        if found is None:
            return
        value, x, y = found
        place = f" {at.format(x=x, y=y)}" if at else ""
        raise InputError(f"{what + ': ' if what else ''}label id {value}{place} is out of range: this model takes "
                         f"ids {self.allowed_label_ids}")

    def channel_index(self, ids, what: str | None = None, check: bool = True):
        """Label ids (numpy) -> int64 one-hot channel index: id 255 -> the last channel where
        accepted (`contain_dontcare_label` True, or None: inferred configs). `check=False` for ids
        already checked (`check_label_ids`) on the way in."""
        import numpy as np

        if check:
            self.check_label_ids(ids, what)
        a = np.asarray(ids).astype(np.int64)
        if self.accepts_dontcare_id:
            a[a == DONTCARE_ID] = self.n_label_channels - 1
        return a

    @property
    def label_dtype(self) -> str:
        """numpy dtype of label-id inputs: uint8 unless ids can exceed 255."""
        return "uint8" if self.n_label_channels <= DONTCARE_ID else "int32"

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        if "label_nc" not in data:
            raise ConfigError("model config is missing the required field 'label_nc'")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError, ArithmeticError) as exc:  # anything validate() did not name
            raise ConfigError(f"invalid model config: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}") from exc

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """The derived sizes, for `asap inspect` and manifests."""
        return {
            "S": self.S,
            "pre_downsample": self.pre_downsample,
            "label_channels": self.n_label_channels,
            "lowres_inputs": self.n_lowres_inputs,
            "mlp_channels": self.mlp_channels,
            "params_per_tile": self.num_params,
            "grid_at_crop": [int(round(self.crop_size / self.aspect_ratio)) // self.S, self.crop_size // self.S],
        }


PRESETS: dict[str, dict[str, Any]] = {
    # The authors' published settings (ASAPNET.md); lr/hr widths are the published defaults.
    "facades": dict(label_nc=13, contain_dontcare_label=False, instance_edges=False, crop_size=1024,
                    aspect_ratio=1.0, reflection_pad=True),
    "cityscapes": dict(label_nc=35, contain_dontcare_label=False, instance_edges=True, crop_size=512,
                       aspect_ratio=2.0, reflection_pad=False),
    # SPADE conventions for the other sets.
    "ade20k": dict(label_nc=150, contain_dontcare_label=True, instance_edges=False, crop_size=512,
                   aspect_ratio=1.0, reflection_pad=False),
    "coco": dict(label_nc=182, contain_dontcare_label=True, instance_edges=True, crop_size=512,
                 aspect_ratio=1.0, reflection_pad=False),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset config, with any field overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---- inference from an authors' state dict ------------------------------------------------
_LR_KEY = re.compile(r"^lowres_stream\.model\.(\d+)\.(.+)$")


def read_config_file(path) -> ModelConfig:
    """A ModelConfig from a JSON file argument: a regular UTF-8 file of at most limits.MAX_JSON_BYTES
    (a FIFO, device or folder is refused before reading); ConfigError (exit 3) naming the file."""
    from .io import read_regular_file
    from .limits import MAX_JSON_BYTES

    data = read_regular_file(path, "--config file", MAX_JSON_BYTES, error=ConfigError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config file is not UTF-8 text (byte {exc.start})") from exc
    try:
        return ModelConfig.from_json(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from exc


def config_from(preset_name: str | None = None, path=None) -> ModelConfig | None:
    """The model config a command was given: `--preset NAME` or `--config FILE` (not both), or None."""
    if preset_name and path:
        raise ConfigError("give either --preset or --config, not both")
    if path:
        return read_config_file(path)
    return preset(preset_name) if preset_name else None


def infer_config(shapes: Mapping[str, Sequence[int]], *, hr_width: int | None = None,
                 hr_depth: int | None = None) -> ModelConfig:
    """Infer the whole config from the key names and shapes of an authors' generator state dict.

    The checkpoint alone cannot tell N classes + don't-care from N+1 classes, so the result has
    `contain_dontcare_label=None` (id 255 maps to the last label channel) and, since only S
    matters to the network, `crop_size = 16*S`, `aspect_ratio = 1`.
    """
    entries: dict[int, dict[str, Sequence[int]]] = {}
    for key, shape in shapes.items():
        m = _LR_KEY.match(key)
        if not m:
            raise CheckpointError(f"unexpected key {key!r}: not an ASAP-Net generator (keys start with 'lowres_stream.model.')")
        entries.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(shape)
    if not entries:
        raise CheckpointError("the checkpoint holds no 'lowres_stream.model.*' weights: not an ASAP-Net generator")
    order = sorted(entries)
    plain_convs = [i for i in order if "0.weight" in entries[i] and len(entries[i]["0.weight"]) == 4]
    blocks = [i for i in order if any(k.startswith("conv_block.") for k in entries[i])]
    final = order[-1]
    if "weight" not in entries[final] or len(entries[final]["weight"]) != 4 or entries[final]["weight"][2:] != (1, 1):
        raise CheckpointError(f"the last layer lowres_stream.model.{final} is not the 1x1 parameter-prediction conv")
    if len(plain_convs) < 1:
        raise CheckpointError("no strided conv layers found in lowres_stream.model")
    reflection_pad = plain_convs[0] == 1
    if plain_convs[0] not in (0, 1):
        raise CheckpointError(f"first conv at lowres_stream.model.{plain_convs[0]} (expected index 0, or 1 with reflection padding)")
    first = entries[plain_convs[0]]["0.weight"]
    n_in, lr_width = first[1], first[0]
    n_ds = len(plain_convs) - 1
    lr_max_width = entries[plain_convs[-1]]["0.weight"][0] if n_ds else lr_width
    n_params = entries[final]["weight"][0]

    candidates = []
    widths = [hr_width] if hr_width else [64, 32, 128, 16, 256, 8, 512]
    depths = [hr_depth] if hr_depth else [5, 2, 3, 4, 6, 7, 8, 9, 10]
    for w in widths:
        for d in depths:
            rest = (d - 2) * (w + 1) * w + (w + 1) * 3
            c0, rem = divmod(n_params - rest - w, w)
            if rem or c0 < 1:
                continue
            for edges in (False, True):
                n_hr = n_in - (1 if edges else 0)
                pe, rem4 = divmod(c0 - n_hr, 4)
                if rem4 or pe < 1 or (2 ** pe) < 2 ** n_ds:
                    continue
                candidates.append((w, d, edges, n_hr, 2 ** pe))
        if candidates:  # the first width (64 = published) that explains the checkpoint wins
            break
    if not candidates:
        raise CheckpointError(
            f"cannot infer the MLP shape: {n_params} parameters per tile fit no hr_width/hr_depth with "
            f"{n_in} low-res input channels; pass --config or --preset"
        )
    if len(candidates) > 1 and not hr_depth:
        candidates = [c for c in candidates if c[1] == 5] or candidates
    if len(candidates) > 1:
        raise CheckpointError(f"ambiguous checkpoint: several configs fit ({candidates}); pass --config or --preset")
    w, d, edges, n_hr, s = candidates[0]
    return ModelConfig(
        label_nc=n_hr, contain_dontcare_label=None, instance_edges=edges, crop_size=16 * s, aspect_ratio=1.0,
        learned_ds_factor=2 ** n_ds, lr_width=lr_width, lr_max_width=lr_max_width, lr_depth=len(blocks),
        hr_width=w, hr_depth=d, reflection_pad=reflection_pad,
    )
