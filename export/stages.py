"""The stages of the model, each with its spellings written once.

    Stage      CLI value (--stage)  report key (JSON, tables)  graph (ONNX file, engine file)
    predictor  predictor            predictor                  predictor
    pixelwise  pixelwise            pixelwise                  pixelwise
    end-to-end end-to-end           end_to_end                 asap

The end-to-end graph is `asap.onnx` (the product card names the model's own file so), its reports
use a key that is a valid identifier, and the command line spells it as users write it.
"""

from __future__ import annotations

from enum import Enum


class Stage(Enum):
    PREDICTOR = ("predictor", "predictor", "predictor")
    PIXELWISE = ("pixelwise", "pixelwise", "pixelwise")
    END_TO_END = ("end-to-end", "end_to_end", "asap")

    def __init__(self, cli: str, key: str, graph: str):
        self.cli = cli  # the --stage value of asap build-engine
        self.key = key  # the stage's key in bench / validate reports
        self.graph = graph  # the ONNX graph (bundle file) and TensorRT engine of the stage

    @classmethod
    def from_graph(cls, graph: str) -> "Stage":
        for s in cls:
            if s.graph == graph:
                return s
        raise ValueError(f"no stage has the graph {graph!r}")

    @classmethod
    def from_key(cls, key: str) -> "Stage":
        for s in cls:
            if s.key == key:
                return s
        raise ValueError(f"no stage has the report key {key!r}")


CLI_VALUES = tuple(s.cli for s in Stage)
KEYS = tuple(s.key for s in Stage)
GRAPHS = tuple(s.graph for s in Stage)
