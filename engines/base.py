"""The Engine interface: label ids in, uint8 RGB out, plus the two stages for validation and
benchmarking. Backends implement `_generate`, `_predict_params` and `_pixelwise`; the public
methods check inputs the same way for every backend (graphs cannot reject bad ids themselves).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from asap_deploy.config import ModelConfig
from asap_deploy.errors import InputError

IMAGE, IMAGE_FLOAT = "image", "image_float"


class Engine(ABC):
    """One backend running one model. Use as a context manager or call close()."""

    name: str = "engine"

    def __init__(self, config: ModelConfig, precision: str = "fp32"):
        self.config = config
        self.precision = precision

    # ---- public API -------------------------------------------------------------------------
    def run(self, labels: np.ndarray, instances: np.ndarray | None = None) -> np.ndarray:
        """labels (N,H,W) ids [+ instances] -> uint8 RGB (N,H,W,3)."""
        return self.generate(labels, instances)[IMAGE]

    def generate(self, labels: np.ndarray, instances: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """End to end: {"image": uint8 (N,H,W,3), "image_float": float32 (N,H,W,3) in [-1,1]}."""
        labels, instances = self.check_inputs(labels, instances)
        return self._generate(labels, instances)

    def predict_params(self, labels: np.ndarray, instances: np.ndarray | None = None) -> np.ndarray:
        """Stage 1: the parameter grid (N, P, H/S, W/S) float32."""
        labels, instances = self.check_inputs(labels, instances)
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

    def close(self) -> None:
        """Release resources (sessions, device memory)."""

    def describe(self) -> dict:
        return {"backend": self.name, "precision": self.precision}

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- input checks -------------------------------------------------------------------------
    def check_inputs(self, labels: np.ndarray, instances: np.ndarray | None,
                     need_instances: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        cfg = self.config
        labels = np.asarray(labels)
        if labels.ndim != 3:
            raise InputError(f"labels must be (N, H, W) ids, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"labels must be integer ids, got dtype {labels.dtype}")
        n, h, w = labels.shape
        S = cfg.S  # noqa: N806
        if n == 0 or h == 0 or w == 0 or h % S or w % S:
            raise InputError(f"label maps of {h}x{w} (HxW), batch {n}: H and W must be positive multiples of S={S} "
                             f"(pad to {-(-h // S) * S}x{-(-w // S) * S})")
        ids = labels.astype(np.int64, copy=False)
        bad = cfg.invalid_label_ids(ids)
        if bad.any():
            raise InputError(f"label id {int(ids[bad].flat[0])} is out of range: this model takes ids "
                             f"{cfg.allowed_label_ids}")
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
