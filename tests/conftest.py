"""Fixtures shared by the test modules: the real broker and the local OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from llm_server import LocalLLMServer, Mode, serve

from cascade.stream.broker import EmbeddedBroker

if TYPE_CHECKING:
    from test_stream_broker import Deployment


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    """A tansu broker over TCP on a free port, one per test module."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture(scope="module")
def llm() -> Iterator[LocalLLMServer]:
    """tests/llm_server.py on a free port, one per test module."""
    with serve() as running:
        yield running


@pytest.fixture
def deployment(broker: EmbeddedBroker, llm: LocalLLMServer, tmp_path: Path) -> Iterator[Deployment]:
    """An isolated deployment (topic prefix, group, data dir) on the module's broker; its workers are killed after."""
    from test_stream_broker import Deployment

    llm.state.default_mode = Mode.OK
    running = Deployment(broker, llm, tmp_path)
    try:
        yield running
    finally:
        running.kill()


@pytest.fixture
def no_ambient_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LLM endpoint or config from the developer's environment leaks into a test's settings."""
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "CASCADE_LLM_BASE_URL", "CASCADE_LLM_API_KEY", "CASCADE_CONFIG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server(no_ambient_llm_env: None) -> Iterator[LocalLLMServer]:
    """tests/llm_server.py on a free port, one per test (its state is per test)."""
    with serve() as running:
        yield running
