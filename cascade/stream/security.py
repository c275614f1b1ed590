"""How every Kafka client of the project authenticates: TLS, SASL, both or neither.

One `KafkaSecurity`, built from the settings (`CASCADE_KAFKA_*`), gives the keyword arguments
of aiokafka's clients (publish, tail, topic admin) and the credentials of the faust workers, so
no client can be made with other options than the rest. Secrets come from the environment or
from files (Kubernetes Secrets mounted as volumes); a file is read when a connection is made,
so a rotated Secret is picked up by the next connection. Nothing here puts a secret in a repr.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.helpers import create_ssl_context
from pydantic import SecretStr

from cascade.settings import SaslMechanism, SecurityProtocol

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

    from cascade.settings import Settings


class KafkaSecurityError(ValueError):
    """The Kafka security settings do not fit together; the message names the setting to fix."""


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise KafkaSecurityError(f"cannot read the Kafka {what} file {path}: {exc.strerror}") from exc


class FileTokenProvider(AbstractTokenProvider):
    """OAUTHBEARER token read from a file at each (re)authentication, e.g. a projected token."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def token(self) -> str:
        return _read_secret(self.path, "OAuth token")

    def __repr__(self) -> str:
        return f"FileTokenProvider({self.path})"


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    mechanism: SaslMechanism | None = None
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    check_hostname: bool = True
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    password_file: Path | None = None
    oauth_token_file: Path | None = None

    @property
    def tls(self) -> bool:
        return self.protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)

    @property
    def sasl(self) -> bool:
        return self.protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL)

    @classmethod
    def from_settings(cls, settings: Settings) -> KafkaSecurity:
        security = cls(
            protocol=settings.kafka_security_protocol,
            mechanism=settings.kafka_sasl_mechanism,
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
            check_hostname=settings.kafka_ssl_check_hostname,
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            password_file=settings.kafka_sasl_password_file,
            oauth_token_file=settings.kafka_sasl_oauth_token_file,
        )
        security.check()
        return security

    def check(self) -> None:
        """Raise KafkaSecurityError naming the first setting that does not fit the protocol."""
        for name, path in (("CA", self.cafile), ("client certificate", self.certfile), ("key", self.keyfile)):
            if path is not None and not path.is_file():
                raise KafkaSecurityError(f"Kafka TLS {name} file not found: {path} (CASCADE_KAFKA_SSL_*)")
        if (self.certfile is None) != (self.keyfile is None):
            raise KafkaSecurityError("set both CASCADE_KAFKA_SSL_CERTFILE and CASCADE_KAFKA_SSL_KEYFILE, or neither")
        if not self.tls and (self.cafile or self.certfile):
            raise KafkaSecurityError(
                f"TLS files are set but CASCADE_KAFKA_SECURITY_PROTOCOL is {self.protocol}: use SSL or SASL_SSL"
            )
        if not self.sasl:
            if self.mechanism is not None:
                raise KafkaSecurityError(
                    f"CASCADE_KAFKA_SASL_MECHANISM is set but the protocol is {self.protocol}: "
                    "use SASL_SSL (or SASL_PLAINTEXT)"
                )
            return
        if self.mechanism is None:
            raise KafkaSecurityError(
                f"CASCADE_KAFKA_SECURITY_PROTOCOL={self.protocol} needs CASCADE_KAFKA_SASL_MECHANISM "
                f"({', '.join(m.value for m in SaslMechanism)})"
            )
        if self.mechanism is SaslMechanism.OAUTHBEARER:
            if self.oauth_token_file is None:
                raise KafkaSecurityError("SASL OAUTHBEARER needs CASCADE_KAFKA_SASL_OAUTH_TOKEN_FILE")
            return
        if not self.username:
            raise KafkaSecurityError(f"SASL {self.mechanism} needs CASCADE_KAFKA_SASL_USERNAME")
        if (self.password is None) == (self.password_file is None):
            raise KafkaSecurityError(
                f"SASL {self.mechanism} needs exactly one of CASCADE_KAFKA_SASL_PASSWORD "
                "and CASCADE_KAFKA_SASL_PASSWORD_FILE"
            )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = create_ssl_context(
            cafile=str(self.cafile) if self.cafile else None,
            certfile=str(self.certfile) if self.certfile else None,
            keyfile=str(self.keyfile) if self.keyfile else None,
        )
        context.check_hostname = self.check_hostname
        return context

    def _password(self) -> str:
        if self.password_file is not None:
            return _read_secret(self.password_file, "SASL password")
        assert self.password is not None  # check() guarantees one of the two
        return self.password.get_secret_value()

    def aiokafka_options(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
        options: dict[str, Any] = {"security_protocol": self.protocol.value}
        if self.tls:
            options["ssl_context"] = self.ssl_context()
        if self.sasl:
            assert self.mechanism is not None
            options["sasl_mechanism"] = self.mechanism.value
            if self.mechanism is SaslMechanism.OAUTHBEARER:
                assert self.oauth_token_file is not None
                options["sasl_oauth_token_provider"] = FileTokenProvider(self.oauth_token_file)
            else:
                options["sasl_plain_username"] = self.username
                options["sasl_plain_password"] = self._password()
        return options

    def faust_credentials(self) -> CredentialsT | None:
        """The same, as faust's `broker_credentials` (None: plaintext)."""
        from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials

        context = self.ssl_context()
        if not self.sasl:
            return SSLCredentials(context) if context is not None else None
        assert self.mechanism is not None
        if self.mechanism is SaslMechanism.OAUTHBEARER:
            assert self.oauth_token_file is not None
            return OAuthCredentials(oauth_cb=FileTokenProvider(self.oauth_token_file), ssl_context=context)
        return SASLCredentials(
            username=self.username, password=self._password(), ssl_context=context, mechanism=self.mechanism.value
        )


PLAINTEXT = KafkaSecurity()
