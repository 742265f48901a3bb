"""The file name of a TensorRT engine, written and read here only: `GRAPH.PRECISION.FLAVOR.engine`
(e.g. `asap.fp16.rtx.engine`), next to its bundle. `asap build-engine` names its engines with
`EngineFile(...).name`; `asap infer/serve --engine FILE` reads what a file holds with `EngineFile.parse`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from asap_deploy.errors import UsageError
from asap_deploy.export.stages import Stage

SUFFIX = "engine"
FORMAT = "GRAPH.PRECISION.FLAVOR.engine"


@dataclass(frozen=True)
class EngineFile:
    graph: str  # a Stage's graph: predictor, pixelwise, asap (end-to-end)
    precision: str  # fp32, fp16
    flavor: str  # tensorrt, rtx

    @property
    def name(self) -> str:
        return f"{self.graph}.{self.precision}.{self.flavor}.{SUFFIX}"

    @property
    def graphs(self) -> tuple[str, ...]:
        """The graphs a runner opens for this file: the end-to-end engine alone, else the two stage
        engines (a predictor or pixelwise engine is one half of a pair)."""
        if self.graph == Stage.END_TO_END.graph:
            return (self.graph,)
        return (Stage.PREDICTOR.graph, Stage.PIXELWISE.graph)

    @classmethod
    def parse(cls, path: str | os.PathLike) -> "EngineFile":
        """The parts of an engine file's name; UsageError naming `path` if it is not of FORMAT."""
        parts = Path(path).name.split(".")
        if len(parts) != 4 or parts[-1] != SUFFIX:
            raise UsageError(f"{path}: not an engine written by asap build-engine ({FORMAT})")
        return cls(parts[0], parts[1], parts[2])


def engine_name(graph: str, precision: str, flavor: str) -> str:
    return EngineFile(graph, precision, flavor).name


def engine_glob(precision: str) -> str:
    """A glob for the engines of any graph and flavor at `precision`."""
    return EngineFile("*", precision, "*").name
