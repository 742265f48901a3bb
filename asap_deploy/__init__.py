"""asap-deploy: ASAP-Net from PyTorch to ONNX and TensorRT, proven equal at every step."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# In a source checkout the sibling folders export/, engines/, plugins/ and cli.py are
# `asap_deploy.export` etc. (an installed wheel maps them with setuptools' package-dir).
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "cli.py").is_file():
    __path__.append(str(_checkout))  # type: ignore[name-defined]
