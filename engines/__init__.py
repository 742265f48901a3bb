"""Inference backends behind one Engine interface, and benchmarking.

Backends import their runtimes lazily: `asap_deploy.engines` itself needs only numpy.
"""

from __future__ import annotations

from .base import IMAGE, IMAGE_FLOAT, Engine
from .registry import ENGINE_NAMES as BACKENDS  # backends that run a bundle (engines/registry.py)
from .registry import check_backend, create_engine

__all__ = ["BACKENDS", "Engine", "IMAGE", "IMAGE_FLOAT", "check_backend", "create_engine"]
