"""Fixtures shared by the CLI tests."""

import pytest


@pytest.fixture
def prompts(tmp_path):
    """A prompt file with one prompt (test files that need others define their own ``prompts``)."""
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle bouncing\n")
    return path
