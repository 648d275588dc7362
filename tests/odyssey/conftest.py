"""Fixtures shared by the odyssey tests."""

from __future__ import annotations

import pytest

from odyssey.prepare import main as prepare_main
from tests.conftest import ROOT


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A token file of this repository's own odyssey/ sources (byte level, 0.3 MB)."""
    out = tmp_path_factory.mktemp("corpus") / "odyssey.bin"
    assert prepare_main([str(ROOT / "odyssey"), "--out", str(out), "--max-mb", "0.3"]) == 0
    return out
