"""Alerting and dashboards: Prometheus' rules and configuration, Alertmanager's routing and
the Grafana dashboard, checked by their own tools where those are installed (Debian's
`prometheus` ships promtool, `prometheus-alertmanager` amtool; scripts/setup.sh installs them
for the test run), and every PromQL query checked against the metrics the worker and
`imgq exporter` export (the exporter's read from a real redis-server)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from imgq.localredis import LocalRedis
from imgq.worker.broker.backlog import BacklogReader
from imgq.worker.metrics import BacklogCollector, WorkerMetrics
from tests.test_compose import _yaml_to_json, needs_compose

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "imgq.json"
RULES = DOCKER / "alert-rules.yml"

_PROMTOOL = shutil.which("promtool")
_AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(
    _PROMTOOL is None, reason="promtool is missing: apt-get install prometheus"
)
needs_amtool = pytest.mark.skipif(
    _AMTOOL is None, reason="amtool is missing: apt-get install prometheus-alertmanager"
)
#: Series Prometheus itself or the client library's process collector provide.
_NOT_IMGQ = {"up", "process_cpu_seconds_total", "process_resident_memory_bytes"}
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                 "unless", "bool", "offset", "inf", "nan"}  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def assert_alert_fires(
    series: Mapping[str, str], eval_time: str, alertname: str, labels: Mapping[str, str]
) -> None:
    """Assert with `promtool test rules` that docker/alert-rules.yml's ``alertname`` fires at
    ``eval_time``, once, with ``labels``, over ``series`` (series -> values in promtool's
    notation, one sample a minute)."""
    assert _PROMTOOL is not None
    firing = {"alertname": alertname, "alertstate": "firing", **labels}
    expected = ",".join(f"{name}={json.dumps(value)}" for name, value in firing.items())
    test = {  # JSON is YAML
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "promql_expr_test": [{
                "expr": f'ALERTS{{alertname="{alertname}",alertstate="firing"}}',
                "eval_time": eval_time,
                "exp_samples": [{"labels": f"ALERTS{{{expected}}}", "value": 1}],
            }],
        }],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test.yml"
        path.write_text(json.dumps(test))
        _run(_PROMTOOL, "test", "rules", str(path))


@pytest.fixture
def exported(redis_server: LocalRedis) -> set[str]:
    """Every series name a worker's or the exporter's metrics can have."""
    return exported_series(redis.Redis.from_url(redis_server.url))


def exported_series(client: redis.Redis) -> set[str]:
    """Every series name a worker's metrics can have, and the exporter's (the backlog and the
    fleet, read from ``client``'s Redis as a scrape reads them)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    registry.register(BacklogCollector([BacklogReader(client, "imgq")], fleet_client=client))
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (functions, label names and values,
    ranges and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # label values
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)  # matchers, ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", text)
    return {n for n in names if n.lower() not in _PROMQL_WORDS}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_metric_names_finds_the_series_and_nothing_else() -> None:
    """The checker the rule and dashboard tests rely on sees series, not syntax."""
    expr = 'sum by (le) (rate(imgq_a_bucket{x="y_z"}[5m])) / ignoring(x) up > 0.5 or vector(0)'
    assert metric_names(expr) == {"imgq_a_bucket", "up"}


# ----------------------------------------------------------------------------- the tools


@needs_promtool
def test_prometheus_config_and_its_rules_check() -> None:
    """`promtool check config` accepts prometheus.yml and the rule file it loads."""
    out = _run(str(_PROMTOOL), "check", "config", "docker/prometheus.yml").stdout
    assert "1 rule files found" in out
    assert "11 rules found" in _run(str(_PROMTOOL), "check", "rules", str(RULES)).stdout


@needs_promtool
def test_alert_rules_pass_their_unit_tests() -> None:
    """`promtool test rules`: a drift page pages, a notice does not; no worker up pages at 2
    minutes, whether discovery keeps the dead targets or drops them (series going stale, as
    with Docker's DNS); a worker lost without a clean shutdown warns, from the survivors'
    record, though its own series vanish, and a clean stop does not; an undeliverable page
    pages; a fleet scaled to zero with nothing to serve does not page, a task waiting with no
    worker does; the oldest ready wait warns past a minute and pages past ten, taken as the
    max of the processes that export it; an unread backlog warns
    (tests/promtool/alert-rules-test.yml)."""
    out = _run(str(_PROMTOOL), "test", "rules", "tests/promtool/alert-rules-test.yml").stdout
    assert "SUCCESS" in out


def test_promtool_drift_series_carry_the_labels_workers_export() -> None:
    """Issue 25: the rule tests feed imgq_drift_alerts_total with the label names a worker
    exports (Prometheus adds job and instance), so they test the series the rule will read."""
    text = (ROOT / "tests" / "promtool" / "alert-rules-test.yml").read_text()
    series = re.findall(r"series: 'imgq_drift_alerts_total\{([^}]*)\}'", text)
    assert len(series) >= 5
    counter = WorkerMetrics(CollectorRegistry()).drift_alerts
    for body in series:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', body))
        assert labels.pop("job") == "imgq-worker" and labels.pop("instance"), body
        counter.labels(**labels)  # ValueError: Incorrect label names


@needs_amtool
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [(["alertname=ImgqDriftPage", "severity=page", "model=shapes"], "imgq-pages"),
     (["alertname=ImgqQueueWaitHigh", "severity=warning"], "imgq-ops")],
)  # fmt: skip
def test_alertmanager_config_checks_and_routes_pages(labels: list[str], receiver: str) -> None:
    """`amtool check-config` accepts alertmanager.yml; pages and warnings reach their
    receivers (`amtool config routes test`)."""
    assert "SUCCESS" in _run(str(_AMTOOL), "check-config", "docker/alertmanager.yml").stdout
    route = _run(
        str(_AMTOOL), "config", "routes", "test", "--config.file=docker/alertmanager.yml", *labels
    )
    assert route.stdout.split() == [receiver]


# ----------------------------------------------------------------------------- the queries


@needs_compose
def test_alert_rules_read_only_exported_metrics(exported: set[str]) -> None:
    """Every rule's expression names series the worker or the exporter exports, and every
    rule has a severity Alertmanager routes on."""
    exported |= _NOT_IMGQ
    rules = [r for g in _yaml_to_json(RULES.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == 11
    for rule in rules:
        unknown = metric_names(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']} reads {unknown}, which no worker exports"
        assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
    drift = next(r for r in rules if r["alert"] == "ImgqDriftPage")
    assert 'tier="page"' in drift["expr"]


def test_dashboard_panels_query_exported_metrics_of_the_provisioned_source(
    exported: set[str],
) -> None:
    """The dashboard's JSON: unique panel ids, each panel on the provisioned data source, in
    the 24-column grid, with queries (unique refIds) that name only exported series."""
    dash = dashboard()
    exported |= _NOT_IMGQ
    panels = dash["panels"]
    assert dash["uid"] and panels
    assert len({p["id"] for p in panels}) == len(panels)
    read: set[str] = set()
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "imgq-prometheus"}, title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets), title
        for target in targets:
            names = metric_names(target["expr"])
            assert names, f"{title}: {target['expr']!r} reads no series"
            assert not names - exported, f"{title} reads {names - exported}: not exported"
            read |= names
    # The dashboard covers the fleet, its backlog, drift and the webhook.
    assert {"up", "imgq_images_total", "imgq_drift_psi", "imgq_alert_webhook_total",
            "imgq_queue_backlog", "imgq_queue_oldest_age_seconds", "imgq_fleet_workers",
            "imgq_fleet_worker_lost_timestamp_seconds"} <= read  # fmt: skip


def test_provisioned_datasource_uid_matches_the_dashboard() -> None:
    """The dashboard's panels name the uid the data source is provisioned with."""
    source = (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert re.search(r"^\s+uid: imgq-prometheus$", source, re.MULTILINE)
    provider = (DOCKER / "grafana" / "provisioning" / "dashboards" / "imgq.yml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider
