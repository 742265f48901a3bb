"""The option checks of the command line, as the app's own API: ranges, seeds, thread counts,
file arguments, NxHxW shapes, and the model config a --preset / --config pair names. The CLI
parses flags and prints; what a value may be is decided here (and in the core's limits)."""

from __future__ import annotations

from pathlib import Path

from ..config import config_from
from ..engines.registry import ENGINE_NAMES  # noqa: F401 - the backends validate (and infer) accept
from ..engines.registry import NAMES as BACKEND_NAMES  # noqa: F401 - every backend bench measures (variants too)
from ..errors import CheckpointError, InputError, UsageError
from ..limits import (MAX_BATCH, MAX_PIXELS_CAP, MAX_SIDE, check_file_arg, check_max_pixels,  # noqa: F401
                      check_optional, check_output_file, check_pixels, check_range, check_seed, check_threads)
from ..precisions import PRECISIONS  # noqa: F401 - the --precision choices, for --help


def precision_choices() -> str:
    """The --precision choices with the backends whose registry row lists each, for --help:
    'fp32 (torch, onnxruntime, tensorrt), fp16 (onnxruntime, tensorrt), ...'."""
    from ..engines.registry import BACKENDS

    parts = []
    for p in PRECISIONS:
        names = [b.name for b in BACKENDS if b.selectable and p in b.precisions]
        parts.append(f"{p} ({', '.join(names) or 'no backend'})")
    return ", ".join(parts)


def auto_order_text() -> str:
    """The order `auto` tries the backends in at each precision, for --help:
    'fp32: tensorrt > onnxruntime CUDA > onnxruntime > openvino > torch; fp16: ...'."""
    from ..engines.registry import auto_order

    return "; ".join(f"{p}: {' > '.join(b.label for b in auto_order(p) if p in b.precisions) or 'none'}"
                     for p in PRECISIONS)


PRECISION_NOTE = "bf16 runs the fp32 graphs with the runtime's bf16 hint; int8 runs the graphs `asap quantize` wrote"


def load_config(preset: str | None, config: Path | None):
    """The ModelConfig of --preset or --config (None if neither; UsageError for both)."""
    return config_from(preset, config)


def check_checkpoint_file(option: str, path: Path | None, folder_ok: bool = False, engine: bool = False) -> None:
    """A checkpoint (exit 4) or engine (exit 5) file argument must be a regular file: a FIFO or
    device would block. A missing file is left to its loader to report."""
    if path is not None:
        check_file_arg(option, path, "engine file" if engine else "checkpoint",
                       error=InputError if engine else CheckpointError, folder_ok=folder_ok)


def check_shape(option: str, text: str | None) -> None:
    """--min/--opt/--max NxHxW (or HxW): N in 1..MAX_BATCH, H and W in 1..MAX_SIDE, N*H*W <= 2^30."""
    if text is None:
        return
    parts = [p for p in str(text).lower().replace("*", "x").replace(",", "x").split("x") if p]
    if len(parts) == 2:
        parts = ["1", *parts]
    if len(parts) != 3 or not all(p.strip().isdigit() and len(p.strip()) <= 12 for p in parts):
        raise UsageError(f"{option} {text!r}: write it as NxHxW with whole numbers, e.g. 1x1024x1024")
    n, h, w = (int(p) for p in parts)
    if not 1 <= n <= MAX_BATCH:
        raise UsageError(f"{option} {text!r}: N must be in 1..{MAX_BATCH} (got {n})")
    for side, v in (("H", h), ("W", w)):
        if not 1 <= v <= MAX_SIDE:
            raise UsageError(f"{option} {text!r}: {side} must be in 1..{MAX_SIDE} (got {v})")
    check_pixels(option, f"{n}x{h}x{w}", n * h * w, MAX_PIXELS_CAP, "the limit")
