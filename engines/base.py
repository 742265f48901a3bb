"""The Engine interface: label ids in, uint8 RGB out, plus the two stages for validation and
benchmarking. Backends implement `_generate`, `_predict_params` and `_pixelwise`; the public
methods check inputs the same way for every backend (graphs cannot reject bad ids themselves).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import numpy as np

from asap_deploy.config import ModelConfig
from asap_deploy.errors import InputError, UsageError

IMAGE, IMAGE_FLOAT = "image", "image_float"


class Engine(ABC):
    """One backend running one model. Use as a context manager or call close()."""

    name: str = "engine"

    def __init__(self, config: ModelConfig, precision: str = "fp32"):
        self.config = config
        self.precision = precision
        self._noted: dict[str, str] = {}

    @property
    def notes(self) -> list[str]:
        """What this engine changed on its own while running (e.g. CUDA graphs turned off), once each."""
        return list(self._noted.values())

    def _note_once(self, key: str, text: str) -> None:
        """Keep `text` in `notes` and warn with it, the first time `key` comes up."""
        if key not in self._noted:
            self._noted[key] = text
            warnings.warn(text, RuntimeWarning, stacklevel=2)

    # ---- public API -------------------------------------------------------------------------
    # `ids_checked=True`: the caller has already checked every id with
    # `ModelConfig.check_label_ids` (asap infer does, per file, to name the file and the pixel);
    # shapes and sizes are still checked here.
    def run(self, labels: np.ndarray, instances: np.ndarray | None = None, *, ids_checked: bool = False) -> np.ndarray:
        """labels (N,H,W) ids [+ instances] -> uint8 RGB (N,H,W,3)."""
        return self.generate(labels, instances, ids_checked=ids_checked)[IMAGE]

    def generate(self, labels: np.ndarray, instances: np.ndarray | None = None, *,
                 ids_checked: bool = False) -> dict[str, np.ndarray]:
        """End to end: {"image": uint8 (N,H,W,3), "image_float": float32 (N,H,W,3) in [-1,1]}."""
        labels, instances = self.check_inputs(labels, instances, ids_checked=ids_checked)
        return self._generate(labels, instances)

    def predict_params(self, labels: np.ndarray, instances: np.ndarray | None = None, *,
                       ids_checked: bool = False) -> np.ndarray:
        """Stage 1: the parameter grid (N, P, H/S, W/S) float32."""
        labels, instances = self.check_inputs(labels, instances, ids_checked=ids_checked)
        return self._predict_params(labels, instances)

    def pixelwise(self, labels: np.ndarray, params: np.ndarray) -> dict[str, np.ndarray]:
        """Stage 2: labels + parameter grid -> {"image", "image_float"}."""
        labels, _ = self.check_inputs(labels, None, need_instances=False)
        n, h, w = labels.shape
        S = self.config.S  # noqa: N806
        want = (n, self.config.num_params, h // S, w // S)
        if tuple(params.shape) != want:
            raise InputError(f"parameter grid has shape {tuple(params.shape)}, expected {want}")
        return self._pixelwise(labels, np.ascontiguousarray(params, dtype=np.float32))

    def scaled_mlp(self, ids: np.ndarray, params: np.ndarray, u_y: np.ndarray, u_x: np.ndarray) -> np.ndarray:
        """The pixelwise MLP on a denser pixel grid (`asap infer --scale`; layout: app/scale.py):
        ids (N,h,Ly,w,Lx) channel indices, params (N,P,h,w), u_y (h,Ly), u_x (w,Lx) -> float32
        (N,h,Ly,w,Lx,3) in [-1, 1]. Only backends whose registry entry has `scale` provide it."""
        raise UsageError(f"the {self.name} backend has no scaled pixelwise stage (asap infer --scale)")

    def close(self) -> None:
        """Release resources (sessions, device memory)."""

    def describe(self) -> dict:
        return {"backend": self.name, "precision": self.precision}

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- input checks -------------------------------------------------------------------------
    def check_inputs(self, labels: np.ndarray, instances: np.ndarray | None, need_instances: bool = True, *,
                     ids_checked: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        cfg = self.config
        labels = np.asarray(labels)
        if labels.ndim != 3:
            raise InputError(f"labels must be (N, H, W) ids, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"labels must be integer ids, got dtype {labels.dtype}")
        n, h, w = labels.shape
        if n == 0 or not cfg.fits_tiles(h, w):
            ph, pw = cfg.padded_size(h, w)
            raise InputError(f"label maps of {h}x{w} (HxW), batch {n}: H and W must be positive multiples of "
                             f"S={cfg.S} (pad to {ph}x{pw})")
        if not ids_checked:
            cfg.check_label_ids(labels, at=None)
        labels = np.ascontiguousarray(labels, dtype=np.dtype(cfg.label_dtype))
        if cfg.instance_edges and need_instances:
            if instances is None:
                raise InputError("this model uses instance edges: an instance map is required")
            instances = np.asarray(instances)
            if instances.shape != labels.shape:
                raise InputError(f"instance map shape {instances.shape} differs from label shape {labels.shape}")
            instances = np.ascontiguousarray(instances, dtype=np.int32)
        else:
            instances = None
        return labels, instances

    # ---- backend hooks ----------------------------------------------------------------------
    @abstractmethod
    def _generate(self, labels: np.ndarray, instances: np.ndarray | None) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _predict_params(self, labels: np.ndarray, instances: np.ndarray | None) -> np.ndarray: ...

    @abstractmethod
    def _pixelwise(self, labels: np.ndarray, params: np.ndarray) -> dict[str, np.ndarray]: ...
