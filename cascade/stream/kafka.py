"""Broker addresses and topic creation, shared by the workers and the command-line clients."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from cascade.stream.security import PLAINTEXT, KafkaSecurity

log = logging.getLogger(__name__)


def bootstrap_servers(url: str) -> list[str]:
    """`host:port` entries from `kafka://h1:9092,h2:9092`, `h1:9092;h2:9092` and similar."""
    servers = []
    for part in url.replace(";", ",").split(","):
        part = part.strip()
        if "://" in part:
            part = part.split("://", 1)[1]
        if part:
            servers.append(part.rstrip("/"))
    if not servers:
        raise ValueError(f"no broker address in {url!r}")
    return servers


async def ensure_topics(
    url: str,
    names: Sequence[str],
    partitions: int,
    replication_factor: int,
    security: KafkaSecurity = PLAINTEXT,
    configs: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns the ones created. Existing topics are left as they are."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers(url), client_id="cascade-admin", **security.aiokafka_options()
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in dict.fromkeys(names) if name not in existing]
        if not missing:
            return []
        with contextlib.suppress(TopicAlreadyExistsError):  # another worker won the race
            await admin.create_topics(
                [NewTopic(name, partitions, replication_factor, topic_configs=configs or {}) for name in missing]
            )
        log.info("created topics %s", ", ".join(missing))
        return missing
    finally:
        await admin.close()
