"""Fixtures of the generation half's tests: the tiny preset's components, an offline Hugging Face home."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def models():
    """The tiny preset's random components (diffusers' dummy-component sizes), built once per module."""
    from tdr.pipeline import load_components

    return load_components(preset="tiny")


@pytest.fixture()
def offline_home(tmp_path, monkeypatch):
    """An empty Hugging Face home with the Hub offline, as on machines without network."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home
