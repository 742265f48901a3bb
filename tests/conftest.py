"""Shared test fixtures: the authors' reference generators and small random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Small generators built and run by the authors' code, with their inputs and outputs: part of the
# repository, so every clone and CI runs the parity tests (how they were made: README.md there).
AUTHORS_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "authors"


def authors_fixture_dir(name: str) -> Path:
    """Folder of one authors' fixture; a missing one is a failure, never a skip."""
    d = AUTHORS_FIXTURES / name
    if not (d / "latest_net_G.pth").is_file():
        pytest.fail(f"authors' fixture missing at {d} (it is part of the repository)")
    return d


def authors_fixture_meta(name: str) -> dict:
    return json.loads((authors_fixture_dir(name) / "meta.json").read_text())


AUTHORS_FIXTURE_NAMES = ["facades_s64", "cityscapes_s16", "dontcare_s32"]


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """A private AOT kernel cache (ASAP_KERNEL_CACHE) for one test module's engine builds."""
    import os

    d = tmp_path_factory.mktemp("kcache")
    old = os.environ.get("ASAP_KERNEL_CACHE")
    os.environ["ASAP_KERNEL_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("ASAP_KERNEL_CACHE", None)
    else:
        os.environ["ASAP_KERNEL_CACHE"] = old
