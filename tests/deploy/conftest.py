"""Fixtures of the container tests (test_image.py, test_stack.py)."""

from __future__ import annotations

import pytest

from tests.deploy.containers import Images, build_images


@pytest.fixture(scope="session")
def images() -> Images:
    """The ingester and Redis images, built once per session by `make image`."""
    return build_images()
