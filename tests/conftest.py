"""Shared test fixtures: the authors' reference generators and small random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

AUTHORS_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "authors"


def authors_fixture_dir(name: str) -> Path:
    """Folder of one authors' fixture. Skips only where ../shared is absent AND CI is unset."""
    d = AUTHORS_FIXTURES / name
    if not d.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"authors' fixtures missing at {d} (CI is set: they must be present)")
        pytest.skip(f"authors' fixtures not found at {d} (../shared is absent outside CI)")
    return d


def authors_fixture_meta(name: str) -> dict:
    return json.loads((authors_fixture_dir(name) / "meta.json").read_text())


AUTHORS_FIXTURE_NAMES = ["facades_s64", "cityscapes_s16", "dontcare_s32"]
