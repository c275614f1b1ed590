"""Runtime settings, from the environment (prefix `CASCADE_`) or a YAML file.

`CASCADE_CONFIG=path.yaml` names an optional file with the same keys (lower case, no
prefix); environment variables win over the file. Secrets are `SecretStr` so they never
print in logs or reprs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

PACKAGE_DIR = Path(__file__).resolve().parent  # package data: policy, default thresholds and model
PROJECT_ROOT = PACKAGE_DIR.parent
# Room a Kafka message needs besides its value: the key (an item id, at most 512 characters,
# so 2 KiB of UTF-8) and the record batch framing.
MESSAGE_FRAMING_BYTES = 4096
DEFAULT_BATCHES_IN_FLIGHT = 2  # per stage not named in stream_concurrency (docs/bench.md)


class SettingsError(ValueError):
    """A setting (environment variable or config file) the operator must fix; the message says which."""


class SecurityProtocol(StrEnum):
    """Kafka's `security.protocol` (cascade/stream/security.py applies it to every client)."""

    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"
    OAUTHBEARER = "OAUTHBEARER"


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the file named by CASCADE_CONFIG, if any."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("CASCADE_CONFIG")
        self._data: dict[str, Any] = {}
        if path:
            try:
                loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except FileNotFoundError:
                raise SettingsError(f"CASCADE_CONFIG names {path}, which does not exist: fix or unset it") from None
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise SettingsError(
                    f"CASCADE_CONFIG file {path} is not readable YAML ({type(exc).__name__}): fix or unset it"
                ) from None
            if not isinstance(loaded, dict):
                raise SettingsError(f"{path}: the config file must hold a mapping of setting names to values")
            self._data = loaded

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


LLMBackendName = Literal["chat", "moderation", "guard"]
GuardFormat = Literal["llama_guard", "shieldgemma"]
PolicyDetail = Literal["full", "brief"]


class LLMRoute(BaseModel):
    """A second LLM endpoint (the fallback or the shadow model); unset fields take the primary's values."""

    model_config = ConfigDict(extra="forbid")

    backend: LLMBackendName
    model: str
    base_url: str | None = None
    api_key: SecretStr | None = None
    guard_format: GuardFormat | None = None


class Settings(BaseSettings):
    # populate_by_name: fields with an env alias (llm_base_url, llm_api_key) must still be settable
    # by name from the config file and in code, not silently ignored.
    model_config = SettingsConfigDict(env_prefix="CASCADE_", extra="ignore", populate_by_name=True)

    def __init__(self, **values: Any) -> None:
        # One line per problem, naming the variable, instead of pydantic's multi-line report.
        # Input values are not echoed: some settings are secrets.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            problems = "; ".join(
                (f"CASCADE_{'.'.join(str(p) for p in err['loc']).upper()}: " if err["loc"] else "")
                + err["msg"].removeprefix("Value error, ")
                for err in exc.errors()
            )
            raise SettingsError(f"invalid settings (environment or CASCADE_CONFIG file): {problems}") from None
        except PydanticSettingsError as exc:
            raise SettingsError(f"{exc} (expected JSON): fix the environment variable or CASCADE_CONFIG file") from None

    # Where runtime state lives (banks, vector index, caches, broker files); never in the package.
    data_dir: Path = Path(".cascade")

    # Intake limits. A record must fit in one Kafka message, so the line limit derives from the
    # stream's message limit (below) and may not exceed it.
    max_text_bytes: int = Field(default=32 * 1024, gt=0)
    max_line_bytes: int | None = Field(
        default=None, gt=0, description="Largest record, bytes; default: the largest message value."
    )
    max_metadata_depth: int = Field(default=16, gt=0)
    reject_unknown_fields: bool = True

    # Artefacts shipped with the project.
    thresholds: Path = PACKAGE_DIR / "defaults" / "thresholds" / "default.yaml"
    model_dir: Path = PACKAGE_DIR / "defaults" / "models" / "default"
    policies_dir: Path = PACKAGE_DIR / "policies"

    # Hash stage.
    near_dup_threshold: float = Field(default=0.7, gt=0, le=1, description="MinHash LSH Jaccard threshold.")
    flood_window: int = Field(default=1000, gt=0, description="Recent items the flood guard looks at.")
    flood_share: float = Field(default=0.05, gt=0, le=1, description="Share of the window that quarantines an entry.")
    flood_min_items: int = Field(default=200, gt=0, description="Window size before the flood guard acts.")
    flood_quarantine_s: float = Field(default=3600.0, gt=0, description="How long a flood quarantine lasts.")

    # Retrieval stage.
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    qdrant_collection: str = "exemplars"
    qdrant_timeout_s: int = Field(default=5, gt=0)
    retrieval_k: int = Field(default=10, gt=0)
    retrieval_min_similarity: float = Field(default=0.3, ge=-1, le=1, description="Neighbours below it do not vote.")
    retrieval_near_copy: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Similarity of a copy of a violation; unset: the encoder's (its card's measured value, "
        "0.95 for the frozen MiniLM).",
    )
    retrieval_prior_weight: float = Field(default=0.5, ge=0, description="Pseudo-neighbour voting 0 in each vote.")

    # Embeddings (shared by retrieval and classifier).
    embedding_threads: int = Field(
        default=0,
        ge=0,
        description=(
            "Encoder threads; 0 = one per core. A graph that needs one pass per text (int8) runs that many "
            "model runs side by side, one thread each; a batched (fp32) graph splits each run over them."
        ),
    )
    embedding_cache_size: int = Field(default=50_000, ge=0, description="Per-process LRU entries by text key.")
    embedding_int8: bool | None = Field(
        default=None,
        description="Serve the int8-quantised graph (true) or fp32 (false); unset: the model card's "
        "default_precision (a frozen model: fp32). See docs/retrieval.md.",
    )
    embedding_spin: bool = Field(
        default=False, description="Let onnxruntime's idle threads busy-wait between passes (docs/bench.md)."
    )

    # Repeat cache (cascade.repeats): a repeated text gets the earlier verdict without re-running the cascade.
    repeat_cache_size: int = Field(default=10_000, ge=0, description="Verdicts kept per process; 0 = off.")
    repeat_cache_ttl_s: float = Field(default=600.0, gt=0, description="Seconds a cached verdict may be re-issued.")

    # LLM stage (OpenAI-compatible). The OPENAI_* names are the openai client's own.
    llm_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("CASCADE_LLM_BASE_URL", "OPENAI_BASE_URL")
    )
    llm_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CASCADE_LLM_API_KEY", "OPENAI_API_KEY")
    )
    llm_model: str = "gpt-4.1-mini-2025-04-14"
    llm_backend: LLMBackendName = Field(default="chat", description="chat | moderation | guard (docs/llm.md).")
    llm_guard_format: GuardFormat = Field(default="llama_guard", description="Answer format of the guard backend.")
    llm_policy_detail: PolicyDetail = Field(
        default="full",
        description="Chat prompt: full policy text per category, or `brief`: its one-line description (small models).",
    )
    llm_fallback: LLMRoute | None = Field(
        default=None, description="Answers when the primary's breaker or budget refuses."
    )
    llm_shadow: LLMRoute | None = Field(default=None, description="Runs beside the primary on a sample, never acting.")
    llm_shadow_sample: float = Field(default=0.0, ge=0, le=1, description="Share of LLM-bound items shadowed.")
    llm_timeout_s: float = Field(default=20.0, gt=0)
    llm_max_retries: int = Field(default=2, ge=0)
    llm_concurrency: int = Field(default=4, gt=0, description="LLM requests in flight at once, per process.")
    llm_rate_per_s: float = Field(default=5.0, gt=0, description="Token-bucket refill rate, requests per second.")
    llm_rate_burst: int = Field(default=10, gt=0, description="Token-bucket capacity (burst of requests).")
    llm_budget_window_s: float = Field(default=3600.0, gt=0, description="Rolling window of the budget caps.")
    llm_budget_items: int | None = Field(default=20_000, gt=0, description="Adjudications per window; null: no cap.")
    llm_budget_usd: float | None = Field(default=20.0, gt=0, description="Dollars per window; null: no cap.")
    llm_breaker_failures: int = Field(default=5, gt=0, description="Consecutive failures that open the breaker.")
    llm_breaker_cooldown_s: float = Field(default=30.0, gt=0, description="Open breaker: seconds before a probe.")
    llm_prices: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="USD per 1M tokens {model: {input, output, cached_input}}, over the built-in table.",
    )
    llm_few_shot_k: int = Field(default=6, ge=0, description="Retrieval neighbours shown as examples.")
    llm_cache_size: int = Field(default=10_000, ge=0, description="Per-process LRU of adjudications.")
    llm_logprobs: bool = Field(default=True, description="Ask for token logprobs to score verdicts.")
    llm_max_output_tokens: int = Field(default=800, gt=0)
    llm_max_text_chars: int = Field(default=8000, gt=0, description="Longer content is cut before the prompt.")

    # Stream layer.
    kafka_url: str | None = None
    # Kafka security (cascade/stream/security.py), for every client: workers, publish, tail, admin.
    kafka_security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle that signed the brokers' certificates.")
    kafka_ssl_certfile: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Client certificate's private key.")
    kafka_ssl_check_hostname: bool = True
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = Field(default=None, description="Read at connect: a mounted Secret.")
    kafka_sasl_oauth_token_file: Path | None = Field(default=None, description="OAUTHBEARER token, read at connect.")
    topic_prefix: str = ""
    stream_group: str = Field(default="cascade", min_length=1, description="Consumer group of the stage workers.")
    stream_partitions: int = Field(default=4, gt=0, description="Partitions of topics the workers create.")
    stream_replication_factor: int = Field(default=1, gt=0)
    stream_create_topics: bool = Field(default=True, description="Create missing topics at worker start.")
    stream_batch_size: int = Field(default=32, gt=0, description="Most items a stage agent takes at once.")
    stream_batch_wait_s: float = Field(default=0.2, gt=0, description="Longest wait to fill a batch.")
    stream_concurrency: dict[str, int] = Field(
        default_factory=lambda: {"llm": 4},
        description=(
            "Batches judged at once per stage, per worker; a stage not named takes 2, so that one batch's "
            "kNN and bookkeeping run while the next one's encoder pass does."
        ),
    )
    stream_session_timeout_s: float = Field(default=6.0, gt=0, description="Consumer group session timeout.")
    stream_max_message_bytes: int = Field(
        default=1_000_000,
        ge=64 * 1024,
        description="Largest Kafka message: producers' max_request_size, max.message.bytes of created topics.",
    )
    stream_linger_ms: int = Field(
        default=5,
        ge=0,
        description=(
            "How long a worker's producer waits to fill a batch (Kafka 4.0's default). At 0 a batch's outputs "
            "leave one or two per request, and the broker spends twice the CPU on them (docs/bench.md)."
        ),
    )
    stream_producer_batch_bytes: int = Field(
        default=256 * 1024,
        ge=16 * 1024,
        description="Largest producer batch per partition; capped at stream_max_message_bytes (one broker message).",
    )
    stream_batch_deadline_s: float = Field(
        default=300.0, gt=0, description="A batch in flight longer than this fails /healthz (the worker is stuck)."
    )
    stream_shutdown_grace_s: float = Field(
        default=20.0, gt=0, description="On SIGTERM, how long in-flight batches may finish; the rest stays uncommitted."
    )
    health_port: int = Field(default=8080, ge=0, le=65535, description="Worker /healthz, /readyz, /metrics.")

    # Drift monitor and audit sample (docs/drift.md).
    drift_window: int = Field(default=2000, gt=0, description="Items per stage (and surface) in the drift window.")
    drift_min_items: int = Field(default=200, gt=0, description="Scores in a window before its PSI is exported.")
    drift_max_surfaces: int = Field(default=16, ge=0, description="Surfaces with their own drift windows.")
    audit_share: float = Field(
        default=0.01, ge=0, le=1, description="Share of automatic verdicts also sent to review as audits."
    )
    audit_window: int = Field(default=500, gt=0, description="Audited blocks the live precision estimate keeps.")

    # Human review (`cascade review serve`, docs/review.md). The URL may hold a password: a secret.
    review_db_url: SecretStr | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir.")
    review_host: str = "127.0.0.1"
    review_port: int = Field(default=8090, ge=0, le=65535)
    review_auth: Literal["password", "header"] = Field(
        default="password", description="Accounts in the store, or an identity header set by a fronting proxy."
    )
    review_identity_header: str = Field(default="X-Forwarded-User", min_length=1)
    review_secret_key: SecretStr | None = Field(
        default=None, description="Signs session cookies; default: a random key kept in data_dir/review/."
    )
    review_cookie_secure: bool = Field(default=False, description="Send the session cookie over HTTPS only.")
    review_session_hours: float = Field(default=8.0, gt=0)
    review_lease_s: float = Field(default=300.0, gt=0, description="How long a claim keeps a task to its reviewer.")
    review_group: str = Field(default="cascade-review", min_length=1, description="Consumer group of the review app.")
    review_bank_feedback: bool = Field(
        default=False, description="Decisions feed the hash and exemplar banks (audited); off by default."
    )

    @model_validator(mode="after")
    def _limits_fit_in_a_message(self) -> Settings:
        if self.max_line_bytes is not None and self.max_line_bytes > self.max_value_bytes:
            raise ValueError(
                f"max_line_bytes ({self.max_line_bytes}) is over the largest message ({self.max_value_bytes}, from"
                " stream_max_message_bytes): lower CASCADE_MAX_LINE_BYTES or raise CASCADE_STREAM_MAX_MESSAGE_BYTES"
            )
        if self.max_text_bytes > self.line_limit:
            raise ValueError(
                f"max_text_bytes ({self.max_text_bytes}) exceeds the record limit ({self.line_limit}):"
                " lower CASCADE_MAX_TEXT_BYTES"
            )
        return self

    @property
    def max_value_bytes(self) -> int:
        """The largest message value a producer may send: the message limit less room for key and framing."""
        return self.stream_max_message_bytes - MESSAGE_FRAMING_BYTES

    def batches_in_flight(self, stages: Sequence[str]) -> int:
        """Batches judged at once by a run of `stages` in one process (`stream_concurrency`)."""
        return max((self.stream_concurrency.get(name, DEFAULT_BATCHES_IN_FLIGHT) for name in stages), default=1)

    @property
    def line_limit(self) -> int:
        """The largest record intake accepts (CASCADE_MAX_LINE_BYTES, default the largest message value)."""
        return self.max_line_bytes or self.max_value_bytes

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
