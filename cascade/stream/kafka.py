"""Broker addresses and topic creation, shared by the workers and the command-line clients."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidTopicError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
)

from cascade.contract import DeadLetterCode
from cascade.stream.security import PLAINTEXT, KafkaSecurity

log = logging.getLogger(__name__)

# Errors that no retry can cure: the output is replaced by a dead letter. Everything else is
# treated as transient (broker down, leader moving, timeouts) and retried.
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
_REFUSED = (InvalidTopicError, TopicAuthorizationFailedError)


def refusal_code(exc: BaseException) -> DeadLetterCode | None:
    """The dead-letter code for an output the broker refuses for good, None when a retry may work.

    The client's error may come wrapped: faust's producer re-raises one refused before sending as
    its own `ProducerSendError`, raised from the client's.
    """
    for error in (exc, exc.__cause__):
        if isinstance(error, _TOO_LARGE):
            return DeadLetterCode.OUTPUT_TOO_LARGE
        if isinstance(error, _REFUSED):
            return DeadLetterCode.OUTPUT_REFUSED
    return None


def unreachable_message(url: str, exc: BaseException) -> str:
    """The operator's one line for a broker that cannot be used (refused, unknown host, timed out)."""
    detail = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
    return (
        f"cannot use the Kafka broker at {url} ({detail}):"
        " check --broker / CASCADE_KAFKA_URL and that the broker is running"
    )


@contextlib.contextmanager
def client_logs_quiet() -> Iterator[None]:
    """Keep the Kafka client's own warnings (one per failed connection attempt) off the terminal:
    the command reports a failure itself, in one line."""
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        client_log.setLevel(level)


def bootstrap_servers(url: str) -> list[str]:
    """`host:port` entries from `kafka://h1:9092,h2:9092`, `h1:9092;h2:9092` and similar.

    Raises ValueError, naming the bad entry, when one is not `HOST[:PORT]` with a port in 1-65535.
    """
    servers = []
    for part in url.replace(";", ",").split(","):
        part = part.strip()
        if "://" in part:
            part = part.split("://", 1)[1]
        part = part.rstrip("/")
        if not part:
            continue
        host, colon, port = part.rpartition(":")
        if colon and (not host or not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError(f"broker address {part!r} is not HOST:PORT with a port in 1-65535 (e.g. 127.0.0.1:9092)")
        servers.append(part)
    if not servers:
        raise ValueError(f"no broker address in {url!r}")
    return servers


async def ensure_topics(
    url: str,
    names: Sequence[str],
    partitions: int,
    replication_factor: int,
    max_message_bytes: int | None = None,
    security: KafkaSecurity = PLAINTEXT,
    configs: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created. Existing topics are left as they are.

    `max_message_bytes` sets the topics' `max.message.bytes`, so the broker accepts what the
    producers (`max_request_size`, the same setting) may send; `configs` adds topic configs
    (e.g. `cleanup.policy=compact`).
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers(url), client_id="cascade-admin", **security.aiokafka_options()
    )
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [name for name in dict.fromkeys(names) if name not in existing]
        if not missing:
            return []
        config = dict(configs or {})
        if max_message_bytes is not None:
            config["max.message.bytes"] = str(max_message_bytes)
        with contextlib.suppress(TopicAlreadyExistsError):  # another worker won the race
            await admin.create_topics(
                [
                    NewTopic(
                        name, num_partitions=partitions, replication_factor=replication_factor, topic_configs=config
                    )
                    for name in missing
                ]
            )
        log.info("created topics %s", ", ".join(missing))
        return missing
    finally:
        await admin.close()
