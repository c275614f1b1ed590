"""Shared test fixture: the ONNX embedding model, exported once and kept in pytest's cache.

Exporting takes ~15 s (torch), so test sessions reuse `.pytest_cache/d/cascade-embedding/models`;
each test still gets its own `data_dir` (tmp_path), whose `models/` links to that cache.
`tests/test_embedding.py::test_export_builds_missing_model` covers the export itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.embedding import Embedder, ensure_onnx_model
from cascade.settings import Settings


@pytest.fixture(scope="session")
def model_cache_dir(pytestconfig: pytest.Config) -> Path:
    cache = pytestconfig.cache
    assert cache is not None, "the cache provider is disabled (-p no:cacheprovider)"
    data_dir = Path(cache.mkdir("cascade-embedding"))
    ensure_onnx_model(Settings(data_dir=data_dir))
    return data_dir / "models"


@pytest.fixture
def settings(tmp_path: Path, model_cache_dir: Path) -> Settings:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_cache_dir, target_is_directory=True)
    return Settings(data_dir=data_dir)


@pytest.fixture(scope="session")
def embedder(model_cache_dir: Path) -> Embedder:
    return Embedder.from_settings(Settings(data_dir=model_cache_dir.parent))
