"""Kafka TLS end to end on the real broker, and the security settings every client shares.

The broker is tansu behind `stunnel4` (Debian): stunnel terminates TLS with a server
certificate signed by a CA the test makes with `openssl`, and demands a client certificate from
the same CA (mutual TLS). tansu advertises the TLS port, so after bootstrapping every client
connection (workers, `cascade publish`, `cascade tail`, the collector) goes through TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError

from cascade.settings import SaslMechanism, SecurityProtocol, Settings
from cascade.stream.broker import EmbeddedBroker, free_port
from cascade.stream.client import Published, publish
from cascade.stream.kafka import ensure_topics
from cascade.stream.local import WorkerProcess, collect
from cascade.stream.security import KafkaSecurity, KafkaSecurityError
from cascade.stream.topics import Topics

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
CLI = str(Path(sys.executable).parent / "cascade")
CASCADE = ["hash"]
BAD = "WINNER!! You have won a free cruise, text CLAIM to 80082 now"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(directory: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    directory.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cascade-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem", cwd=directory)  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(TLS bootstrap address, PKI directory) of tansu behind stunnel."""
    if STUNNEL is None:
        pytest.fail("stunnel4 is not installed (it is listed in .ci/system-packages.txt: run `make system-packages`)")
    root = tmp_path_factory.mktemp("kafka-tls")
    pki = make_pki(root / "pki")
    tls_port = free_port()
    config = root / "stunnel.conf"
    with EmbeddedBroker(advertised_port=tls_port) as broker:
        config.write_text(
            "foreground = yes\n"
            f"pid = {root / 'stunnel.pid'}\n"
            "[kafka]\n"
            f"accept = 127.0.0.1:{tls_port}\n"
            f"connect = 127.0.0.1:{broker.port}\n"
            f"cert = {pki / 'server.pem'}\nkey = {pki / 'server.key'}\n"
            f"CAfile = {pki / 'ca.pem'}\nverifyChain = yes\nrequireCert = yes\n"
        )
        log = (root / "stunnel.log").open("wb")
        stunnel = subprocess.Popen([STUNNEL, str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _listening(tls_port):
                assert stunnel.poll() is None, (root / "stunnel.log").read_text()
                time.sleep(0.05)
            yield f"127.0.0.1:{tls_port}", pki
        finally:
            stunnel.terminate()
            stunnel.wait(10)
            log.close()


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def tls_env(pki: Path, client_cert: bool = True) -> dict[str, str]:
    env = {"CASCADE_KAFKA_SECURITY_PROTOCOL": "SSL", "CASCADE_KAFKA_SSL_CAFILE": str(pki / "ca.pem")}
    if client_cert:
        env["CASCADE_KAFKA_SSL_CERTFILE"] = str(pki / "client.pem")
        env["CASCADE_KAFKA_SSL_KEYFILE"] = str(pki / "client.key")
    return env


def security_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> KafkaSecurity:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return KafkaSecurity.from_settings(Settings())


@pytest.mark.broker
@pytest.mark.slow
def test_verdicts_through_tls_only(
    tls_broker: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, pki = tls_broker
    prefix = f"tls{uuid.uuid4().hex[:6]}."
    env = {
        **tls_env(pki),
        "CASCADE_TOPIC_PREFIX": prefix,
        "CASCADE_STREAM_GROUP": f"g{uuid.uuid4().hex[:6]}",
        "CASCADE_DATA_DIR": str(tmp_path / "data"),
    }
    bank = subprocess.run(
        [CLI, "bank", "add", BAD, "--bad", "-c", "spam"],
        env={**os.environ, **env},
        capture_output=True,
        timeout=120,
    )
    assert bank.returncode == 0, bank.stderr.decode()
    security = security_of(env, monkeypatch)
    topics = Topics(prefix)
    asyncio.run(ensure_topics(url, topics.all_topics(CASCADE), 2, 1, security=security))
    worker = WorkerProcess(url, cascade=CASCADE, log_path=tmp_path / "worker.log", env=env).start()
    try:
        worker.wait_ready(120)
        items = tmp_path / "items.jsonl"
        records = [{"id": "bad", "text": BAD}, *({"id": f"ok{n}", "text": f"see you at {n}"} for n in range(4))]
        items.write_text("".join(json.dumps(r) + "\n" for r in records))
        published = subprocess.run(
            [CLI, "publish", str(items), "--broker", url],
            env={**os.environ, **env},
            capture_output=True,
            timeout=120,
        )
        assert published.returncode == 0, published.stderr.decode()
        assert "published 5 records" in published.stderr.decode()
        expected = [Published(r["id"].encode(), "", sent_at=datetime.now(UTC)) for r in records]
        outcomes = asyncio.run(collect(url, topics, expected, timeout_s=120, security=security))
        assert outcomes.verdicts["bad"].decision.value == "block"
        assert {outcomes.verdicts[f"ok{n}"].decision.value for n in range(4)} == {"review"}
        tail = subprocess.run(
            [CLI, "tail", "--broker", url, "--idle", "3"],
            env={**os.environ, **env},
            capture_output=True,
            timeout=120,
        )
        assert tail.returncode == 0, tail.stderr.decode()
        assert {json.loads(line)["id"] for line in tail.stdout.splitlines()} == {r["id"] for r in records}
    finally:
        worker.stop()
    # The broker itself demands the client certificate: without it nothing connects.
    monkeypatch.delenv("CASCADE_KAFKA_SSL_CERTFILE")
    monkeypatch.delenv("CASCADE_KAFKA_SSL_KEYFILE")
    no_cert = security_of(tls_env(pki, client_cert=False), monkeypatch)
    with pytest.raises(KafkaConnectionError):
        asyncio.run(publish(url, topics, [b'{"id": "x", "text": "y"}'], security=no_cert))


def test_settings_map_to_every_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from faust.auth import OAuthCredentials, SASLCredentials

    secret = tmp_path / "password"
    secret.write_text("s3cret-from-a-file\n")
    scram = security_of(
        {
            "CASCADE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "CASCADE_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "CASCADE_KAFKA_SASL_USERNAME": "cascade",
            "CASCADE_KAFKA_SASL_PASSWORD_FILE": str(secret),
        },
        monkeypatch,
    )
    options = scram.aiokafka_options()
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "cascade" and options["sasl_plain_password"] == "s3cret-from-a-file"
    assert options["ssl_context"] is not None
    credentials = scram.faust_credentials()
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL" and credentials.mechanism.value == "SCRAM-SHA-512"
    assert "s3cret" not in repr(scram) + repr(credentials)
    secret.write_text("rotated\n")  # a rotated Secret is read at the next connection
    assert scram.aiokafka_options()["sasl_plain_password"] == "rotated"

    monkeypatch.delenv("CASCADE_KAFKA_SASL_PASSWORD_FILE")
    token = tmp_path / "token"
    token.write_text("eyJ.token\n")
    monkeypatch.setenv("CASCADE_KAFKA_SASL_MECHANISM", "OAUTHBEARER")
    monkeypatch.setenv("CASCADE_KAFKA_SASL_OAUTH_TOKEN_FILE", str(token))
    oauth = KafkaSecurity.from_settings(Settings())
    provider = oauth.aiokafka_options()["sasl_oauth_token_provider"]
    assert asyncio.run(provider.token()) == "eyJ.token"
    assert isinstance(oauth.faust_credentials(), OAuthCredentials)
    assert KafkaSecurity().aiokafka_options() == {"security_protocol": "PLAINTEXT"}
    assert SecurityProtocol("SASL_PLAINTEXT") and SaslMechanism("SCRAM-SHA-256")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CASCADE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs CASCADE_KAFKA_SASL_MECHANISM"),
        (
            {"CASCADE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "CASCADE_KAFKA_SASL_MECHANISM": "PLAIN"},
            "needs CASCADE_KAFKA_SASL_USERNAME",
        ),
        ({"CASCADE_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "TLS CA file not found: /nonexistent/ca.pem"),
        ({"CASCADE_KAFKA_SASL_MECHANISM": "PLAIN"}, "use SASL_SSL"),
    ],
)
def test_operator_mistakes_get_one_line_and_exit_2(env: dict[str, str], message: str, tmp_path: Path) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text('{"id": "a", "text": "b"}\n')
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_KAFKA")}
    run = subprocess.run(
        [CLI, "publish", str(items), "--broker", "127.0.0.1:9"],
        env={**clean, "CASCADE_KAFKA_SASL_PASSWORD": "never-printed", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and message in run.stderr and "Traceback" not in run.stderr


def test_no_password_in_logs_or_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    security = security_of(
        {
            "CASCADE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "CASCADE_KAFKA_SASL_MECHANISM": "PLAIN",
            "CASCADE_KAFKA_SASL_USERNAME": "u",
            "CASCADE_KAFKA_SASL_PASSWORD": "hunter2-secret",
        },
        monkeypatch,
    )
    assert "hunter2" not in repr(security) and "hunter2" not in repr(Settings())
    assert "hunter2" not in repr(security.faust_credentials())
    with pytest.raises(KafkaSecurityError):
        KafkaSecurity(protocol=SecurityProtocol.SASL_SSL, mechanism=SaslMechanism.PLAIN, username="u").check()
