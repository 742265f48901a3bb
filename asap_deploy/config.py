"""ModelConfig: every shape of an ASAP-Net generator, its presets, and inference from a checkpoint.

Pure Python (no torch): `asap inspect` and the inference-only backends use it too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import CheckpointError, ConfigError

DONTCARE_ID = 255  # the id of "don't care" pixels in label maps (SPADE convention)


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
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"invalid model config: {msg}")

        for name in ("label_nc", "crop_size", "lr_width", "lr_max_width", "hr_width", "output_nc"):
            if int(getattr(self, name)) < 1:
                raise bad(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.lr_depth < 0:
            raise bad(f"lr_depth must be >= 0 (got {self.lr_depth})")
        if self.hr_depth < 2:
            raise bad(f"hr_depth must be >= 2 (got {self.hr_depth})")
        if self.aspect_ratio <= 0:
            raise bad(f"aspect_ratio must be > 0 (got {self.aspect_ratio})")
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
        """Boolean mask over an integer numpy array of label ids: True where this model does not take the id."""
        bad = (ids < 0) | (ids >= self.n_label_channels)
        if self.accepts_dontcare_id:
            bad &= ids != DONTCARE_ID
        return bad

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
        except (TypeError, ValueError) as exc:  # e.g. label_nc "x": int() in validate()
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
