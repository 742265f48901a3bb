"""Typed errors: every failure a user can cause carries a message and an exit code.

Only cli.py prints and exits; the library raises these.
"""

from __future__ import annotations


class AsapError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(AsapError):
    """Bad flags or option values."""

    exit_code = 2


class ConfigError(AsapError):
    """A model configuration that is invalid or does not fit the data."""

    exit_code = 3


class CheckpointError(AsapError):
    """A checkpoint that cannot be read or does not match the model."""

    exit_code = 4


class InputError(AsapError):
    """A label map, instance map or image that is unreadable or invalid."""

    exit_code = 5


class DatasetError(InputError):
    """A dataset folder that is missing files or holds inconsistent pairs."""


class BundleError(AsapError):
    """An exported bundle that is missing files, was altered, or has an unknown manifest schema."""

    exit_code = 8


class ValidationFailed(AsapError):
    """A backend's output is outside the stated thresholds (asap validate)."""

    exit_code = 9


class KernelError(AsapError):
    """The fused kernel cannot be compiled, loaded or launched (plugins/)."""

    exit_code = 10


class EngineError(AsapError):
    """A TensorRT engine that cannot be built, or whose sidecar does not match (rebuild it)."""

    exit_code = 11


class OutputError(AsapError):
    """An output that cannot be written (unwritable folder, disk full) or already exists without --overwrite."""

    exit_code = 12


class BenchRowsFailed(AsapError):
    """`asap bench`: a requested row failed to load or run (the reports are written all the same)."""

    exit_code = 13


class MissingDependencyError(AsapError):
    """An optional dependency (extra) is needed for this command."""

    exit_code = 6


def require_torch(feature: str):
    """Import torch or raise a MissingDependencyError naming the extra to install."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised in torch-free installs
        raise MissingDependencyError(
            f"{feature} needs PyTorch. Install it with: pip install 'asap-deploy[torch]' "
            "(CPU-only machines: pip install torch==2.13.0 first, or use constraints.txt)."
        ) from exc
    return torch


# Optional modules -> the extra of asap-deploy that installs them (pyproject.toml's optional-dependencies).
EXTRAS = {
    "torch": "torch", "matplotlib": "torch", "onnxconverter_common": "torch",
    "triton": "gpu", "cuda": "gpu",
    "tensorrt": "tensorrt", "tensorrt_rtx": "rtx",
    "pytriton": "serve", "tritonclient": "serve",
    "ray": "ray",
    "openvino": "openvino",
}


def require_module(name: str, feature: str, extra: str | None = None):
    """Import `name` or raise a MissingDependencyError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        err = missing_dependency(exc, feature, extra, name)
        raise err or MissingDependencyError(f"{feature} needs {name}, which is not installed") from exc


def missing_dependency(exc: ImportError, feature: str, extra: str | None = None,
                       name: str | None = None) -> MissingDependencyError | None:
    """The MissingDependencyError for an ImportError of one of EXTRAS' modules (None for any other
    module: that is a broken install or a bug, not a missing extra)."""
    top = (name or getattr(exc, "name", None) or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra = extra or EXTRAS[top]
    return MissingDependencyError(f"{feature} needs {top}, which is not installed: pip install 'asap-deploy[{extra}]'")


def did_you_mean(value: str, choices) -> str:
    """"; did you mean 'x'?" naming the nearest of `choices`, or "" (a hint for an error message:
    the guess is suggested, never run)."""
    import difflib

    near = difflib.get_close_matches(value, list(choices), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""
