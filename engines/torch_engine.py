"""The PyTorch reference backend (fp32; CPU unless a device is given)."""

from __future__ import annotations

import os

import numpy as np

from asap_deploy.errors import require_torch
from asap_deploy.io import to_uint8

from .base import IMAGE, IMAGE_FLOAT, Engine


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model, device: str = "cpu", fused: bool | None = None):
        """`fused`: run the pixelwise stage with the fused Triton kernel (fp16 dots); the default is
        on for CUDA devices where the kernel supports the config, off on CPU (per-tile fp32 path)."""
        torch = require_torch("the torch backend")
        super().__init__(model.cfg, "fp32")
        self._torch = torch
        self.device = torch.device(device)
        self.model = model.to(self.device).float().eval()
        self.source = "model"
        if fused is None:
            fused = self.device.type == "cuda" and _kernel_supports(model.cfg)
        self.fused = fused

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, config=None, preset=None, device: str = "cpu") -> "TorchEngine":
        from asap_deploy.checkpoints import load_generator

        model, _ = load_generator(path, config, preset)
        eng = cls(model, device)
        eng.source = f"checkpoint {path}"
        return eng

    @classmethod
    def from_bundle(cls, bundle, device: str = "cpu") -> "TorchEngine":
        """The generator rebuilt from the bundle: config from the manifest, weights read back from
        predictor.onnx and checked bit for bit against the manifest's weights_sha256."""
        eng = cls(model_from_bundle(bundle), device)
        eng.source = bundle_source(bundle)
        return eng

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "source": self.source,
                "pixelwise": "fused Triton kernel" if self.fused else "per-tile PyTorch"}

    def _t(self, a: np.ndarray | None):
        return None if a is None else self._torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _out(self, rgb) -> dict[str, np.ndarray]:
        f = rgb.float().cpu().numpy()
        return {IMAGE: to_uint8(f), IMAGE_FLOAT: f}

    def _rgb(self, labels, params):
        """Pixelwise stage -> (N, H, W, 3) float."""
        if self.fused:
            from asap_deploy.plugins.torch_op import spatial_mlp

            return spatial_mlp(labels, params, self.config)
        return self.model.pixelwise(labels, params)

    def _generate(self, labels, instances):
        with self._torch.inference_mode():
            if self.fused:
                lab = self._t(labels)
                return self._out(self._rgb(lab, self.model.predict_params(lab, self._t(instances))))
            return self._out(self.model(self._t(labels), self._t(instances)).permute(0, 2, 3, 1))

    def _predict_params(self, labels, instances):
        with self._torch.inference_mode():
            return self.model.predict_params(self._t(labels), self._t(instances)).float().cpu().numpy()

    def _pixelwise(self, labels, params):
        with self._torch.inference_mode():
            return self._out(self._rgb(self._t(labels), self._t(params)))

    def scaled_mlp(self, ids, params, u_y, u_x):
        """The scaled pixelwise stage (asap infer --scale): batched matmuls over tiles (engines/scaled.py)."""
        from .scaled import tiled_mlp_torch

        with self._torch.inference_mode():
            p = self._torch.from_numpy(np.ascontiguousarray(params, np.float32)).to(self.device)
            return tiled_mlp_torch(ids, p, u_y, u_x, self.config).float().cpu().numpy()


def _kernel_supports(cfg) -> bool:
    from asap_deploy.errors import ConfigError
    from asap_deploy.plugins.spec import kernel_spec

    try:
        kernel_spec(cfg)
    except ConfigError:
        return False
    return True


def bundle_source(bundle) -> str:
    return f"bundle {bundle.path} (weights from predictor.onnx, sha256-checked)"


def model_from_bundle(bundle):
    """The generator of `bundle` (fp32, CPU): config from the manifest, weights read back from
    predictor.onnx and checked bit for bit against the manifest's weights_sha256."""
    torch = require_torch("the torch backend")
    from asap_deploy.errors import BundleError
    from asap_deploy.export.bundle import state_dict_from_bundle
    from asap_deploy.model import ASAPNetGenerator

    with torch.device("meta"):  # shapes of the manifest's model, nothing allocated yet
        skeleton = ASAPNetGenerator(bundle.config)
    specs = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in skeleton.state_dict().items()}
    del skeleton
    # every weight checked (shape, dtype, finite, weights_sha256) before the real model is built
    state = state_dict_from_bundle(bundle, specs)
    model = ASAPNetGenerator(bundle.config)
    try:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:  # pragma: no cover - the checks above leave nothing for torch to refuse
        first = (str(exc).strip().splitlines() or ["RuntimeError"])[0]
        raise BundleError(f"{bundle.path / 'predictor.onnx'}: its weights do not fit the model of the "
                          f"manifest's config: {first}") from exc
    return model
