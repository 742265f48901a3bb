"""The authors' forward (the speed baseline) now lives in the library, asap_deploy/engines/authors.py,
so that `asap bench` can include it; this module re-exports it for the benchmark scripts and tests."""

from asap_deploy.engines.authors import AuthorsForward, full_res_encoding, random_generator  # noqa: F401
