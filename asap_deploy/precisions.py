"""The numeric precisions, each written once: which bundle files a precision reads and what runs
in it. Every command that takes --precision reads this table (backends list theirs in
engines/registry.py; thresholds per precision live in engines/validate.py).

    precision  bundle files it reads          what computes in it
    fp32       predictor.onnx ...             everything (the reference)
    fp16       predictor.fp16.onnx ...        weights and activations (InstanceNorm, casts in fp32)
    bf16       predictor.onnx ... (the fp32)  the runtime's bf16 hint: matmuls/convs in bf16 where the
                                              CPU has bf16 units, fp32 islands where the runtime keeps them
    int8       predictor.int8.onnx ...        written by `asap quantize`: the quantized layers (QDQ) in
                                              int8, everything else in fp32
"""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
FILE_PRECISIONS = ("fp32", "fp16", "int8")  # precisions a bundle holds graph files of
QUANTIZED = "int8"  # the precision whose graphs `asap quantize` writes


def graph_precision(precision: str) -> str:
    """The precision of the bundle files that `precision` runs: bf16 is a runtime hint on the
    fp32 graphs; every other precision has files of its own."""
    return "fp32" if precision == "bf16" else precision


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISIONS, option: str = "--precision") -> str:
    """`precision` if it is one of `allowed`, else a UsageError naming the choices."""
    from asap_deploy.errors import UsageError, did_you_mean

    if precision not in allowed:
        raise UsageError(f"unknown {option} {precision!r}{did_you_mean(str(precision), allowed)} "
                         f"(choose from: {', '.join(allowed)})")
    return precision
