"""Shared test fixtures: the serving encoder, and the frozen MiniLM export kept in pytest's cache.

`settings` and `embedder` serve the default model (the tuned encoder shipped in the package).
The frozen design's export takes ~15 s (torch), so test sessions reuse
`.pytest_cache/d/cascade-embedding/models`; each test still gets its own `data_dir` (tmp_path),
whose `models/` links to that cache. `frozen_settings` / `frozen_embedder` select the frozen
encoder (a model directory without a tuned card). `tests/test_embedding.py::test_export_builds_missing_model`
covers the export itself.
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


def frozen(settings: Settings) -> Settings:
    """The same settings serving the frozen MiniLM: a model directory that holds no tuned encoder."""
    return settings.model_copy(update={"model_dir": settings.data_dir / "frozen-heads"})


@pytest.fixture
def frozen_settings(settings: Settings) -> Settings:
    return frozen(settings)


@pytest.fixture(scope="session")
def frozen_embedder(model_cache_dir: Path) -> Embedder:
    return Embedder.from_settings(frozen(Settings(data_dir=model_cache_dir.parent)))
