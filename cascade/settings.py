"""Runtime settings, from the environment (prefix `CASCADE_`) or a YAML file.

`CASCADE_CONFIG=path.yaml` names an optional file with the same keys (lower case, no
prefix); environment variables win over the file. Secrets are `SecretStr` so they never
print in logs or reprs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the file named by CASCADE_CONFIG, if any."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("CASCADE_CONFIG")
        self._data: dict[str, Any] = {}
        if path:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the config file must hold a mapping of setting names to values")
            self._data = loaded

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CASCADE_", extra="ignore")

    # Where runtime state lives (banks, vector index, caches, broker files); never in the package.
    data_dir: Path = Path(".cascade")

    # Intake limits.
    max_text_bytes: int = Field(default=32 * 1024, gt=0)
    max_line_bytes: int = Field(default=1024 * 1024, gt=0)
    max_metadata_depth: int = Field(default=16, gt=0)
    reject_unknown_fields: bool = True

    # Artefacts shipped with the project.
    thresholds: Path = PROJECT_ROOT / "thresholds" / "default.yaml"
    model_dir: Path = PROJECT_ROOT / "models" / "default"
    policies_dir: Path = PROJECT_ROOT / "cascade" / "policies"

    # Hash stage.
    near_dup_threshold: float = Field(default=0.7, gt=0, le=1, description="MinHash LSH Jaccard threshold.")
    flood_window: int = Field(default=1000, gt=0, description="Recent items the flood guard looks at.")
    flood_share: float = Field(default=0.05, gt=0, le=1, description="Share of the window that quarantines an entry.")
    flood_min_items: int = Field(default=200, gt=0, description="Window size before the flood guard acts.")

    # Retrieval stage.
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    retrieval_k: int = Field(default=10, gt=0)

    # LLM stage (OpenAI-compatible). The OPENAI_* names are the openai client's own.
    llm_base_url: str | None = Field(default=None, validation_alias=AliasChoices("CASCADE_LLM_BASE_URL", "OPENAI_BASE_URL"))
    llm_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("CASCADE_LLM_API_KEY", "OPENAI_API_KEY"))
    llm_model: str = "gpt-4.1-mini-2025-04-14"
    llm_timeout_s: float = Field(default=20.0, gt=0)
    llm_max_retries: int = Field(default=2, ge=0)

    # Stream layer.
    kafka_url: str | None = None
    topic_prefix: str = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlFileSource(settings_cls), file_secret_settings

    def data_path(self, *parts: str) -> Path:
        """A path under the data directory, creating the directory."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir.joinpath(*parts)
