"""Checkpoints: ours (config + weights) and the authors' `latest_net_G.pth` (plain state dict).

A checkpoint is untrusted input: it is always read with `torch.load(weights_only=True)`, which
refuses pickles that would run code. Loading is strict; a mismatch is reported as a readable diff.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import ModelConfig, infer_config, preset as make_preset
from .errors import CheckpointError, ConfigError, OutputError, require_torch
from .io import atomic_path

FORMAT = "asap-deploy/generator"
FORMAT_VERSION = 1


@dataclass
class LoadedCheckpoint:
    config: ModelConfig
    state_dict: dict[str, Any]
    kind: str  # "asap-deploy" or "authors"
    config_source: str  # "checkpoint", "inferred", "preset <name>", "given"
    path: Path


def read_state(path: str | os.PathLike) -> Any:
    """torch.load with weights_only=True and errors that name the file."""
    torch = require_torch("reading checkpoints")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused to load: the file is not a plain weights file (it would need to run code "
            f"or is corrupt). Only tensors and plain containers are accepted. Details: {first}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            # damaged bytes reach torch's weights-only unpickler as broken opcodes/arguments:
            LookupError, TypeError, AttributeError, OverflowError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc


def _state_dict_of(obj: Any, path: Path) -> tuple[dict[str, Any], ModelConfig | None, str]:
    torch = require_torch("reading checkpoints")
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if obj.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {obj.get('version')!r} is not supported "
                                  f"(this asap-deploy reads version {FORMAT_VERSION})")
        try:
            cfg = ModelConfig.from_dict(obj.get("config", {}))
        except ConfigError as exc:  # a damaged or hand-edited checkpoint: say which file
            raise CheckpointError(f"{path}: the model config stored in the checkpoint is invalid: {exc.message}") from exc
        sd, kind = obj.get("state_dict"), "asap-deploy"
    elif isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        sd, cfg, kind = obj, None, "authors"
    else:
        raise CheckpointError(f"{path}: not a generator checkpoint (expected a state dict or an asap-deploy checkpoint, "
                              f"found {type(obj).__name__})")
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: the state dict holds values that are not tensors")
    return dict(sd), cfg, kind


def load_checkpoint(path: str | os.PathLike, config: ModelConfig | None = None,
                    preset: str | None = None) -> LoadedCheckpoint:
    """Read a checkpoint and settle its config: given > preset > stored > inferred from shapes."""
    path = Path(path)
    sd, stored, kind = _state_dict_of(read_state(path), path)
    if config is not None:
        cfg, source = config, "given"
    elif preset is not None:
        cfg, source = make_preset(preset), f"preset {preset}"
    elif stored is not None:
        cfg, source = stored, "checkpoint"
    else:
        try:
            cfg = infer_config({k: tuple(v.shape) for k, v in sd.items()})
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc.message}") from exc
        source = "inferred"
    return LoadedCheckpoint(cfg, sd, kind, source, path)


def state_dict_diff(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Readable lines: missing keys, unexpected keys, shape mismatches."""
    lines = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    for title, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            lines.append(f"{len(keys)} {title} key(s): {shown}")
    for k in shapes[:8]:
        lines.append(f"shape mismatch at {k}: model {tuple(expected[k].shape)}, checkpoint {tuple(found[k].shape)}")
    if len(shapes) > 8:
        lines.append(f"... and {len(shapes) - 8} more shape mismatches")
    return lines


def load_generator(path: str | os.PathLike, config: ModelConfig | None = None, preset: str | None = None):
    """Build the generator for a checkpoint and load its weights strictly. Returns (model, LoadedCheckpoint)."""
    torch = require_torch("loading a generator")
    from .model import ASAPNetGenerator

    ck = load_checkpoint(path, config, preset)
    model = ASAPNetGenerator(ck.config)
    diff = state_dict_diff(model.state_dict(), ck.state_dict)
    if diff:
        raise CheckpointError(f"{ck.path}: the weights do not match the model config ({ck.config_source}):\n  "
                              + "\n  ".join(diff))
    bad = [k for k, v in ck.state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{ck.path}: NaN or Inf values in {len(bad)} tensor(s): {', '.join(bad[:5])}")
    model.load_state_dict(ck.state_dict, strict=True)
    return model.eval(), ck


def save_generator(model, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write our checkpoint format atomically: {format, version, config, state_dict, extra}."""
    obj = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.cfg.to_dict(),
           "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
           "extra": dict(extra or {})}
    save_atomic(obj, path)
    return Path(path)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file renamed over `path`; a failed write (disk full: torch raises
    RuntimeError, not OSError) is an OutputError naming `path` and leaves no file behind."""
    torch = require_torch("saving checkpoints")
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            raise OutputError(f"{path}: cannot write ({str(exc).strip().splitlines()[-1]}); nothing was written") from exc
    return Path(path)
