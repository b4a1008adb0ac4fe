"""deploy/kubernetes: rendered by kustomize (kubectl's) and validated by real validators
(scripts/check_kubernetes.py: kubernetes-validate's schemas of Kubernetes, check-jsonschema with
KEDA's ScaledObject schema kept in the repository); a typo in the ScaledObject must fail them.
Then what no schema knows: the manifests agree with each other and with imgq (its commands, its
settings, its health check, its shutdown)."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from imgq.cli import build_parser
from imgq.worker.settings import ENV_VARS
from tests.test_alerting import exported_series, metric_names

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_kubernetes.py"
DEPLOY = ROOT / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
EXTERNAL = DEPLOY / "overlays" / "external-redis"
TRAIN = DEPLOY / "jobs" / "train"

_spec = importlib.util.spec_from_file_location("check_kubernetes", CHECK)
assert _spec is not None and _spec.loader is not None
check_kubernetes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_kubernetes)

#: Environment variables of the manifests that are not imgq settings.
_NOT_SETTINGS = {"REDIS_PASSWORD", "TF_CPP_MIN_LOG_LEVEL", "HOME", "TRAIN_MODEL_NAME"}


def _check(*targets: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), *map(str, targets)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _objects(target: Path) -> list[dict[str, Any]]:
    return list(check_kubernetes.render(target))


def _one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return _objects(BASE)


# ----------------------------------------------------------------------------- the validators


def test_every_kustomization_is_checked() -> None:
    """The checker's default targets are the three kustomizations shipped."""
    assert check_kubernetes.kustomizations() == sorted([BASE, EXTERNAL, TRAIN])


@pytest.mark.parametrize("target", [BASE, EXTERNAL, TRAIN], ids=lambda p: p.name)
def test_manifests_pass_the_validators(target: Path) -> None:
    """Rendered by kustomize, every object passes its schema: Kubernetes' kinds against
    Kubernetes 1.29 and 1.37 (strict: no unknown field), the ScaledObject against KEDA's."""
    proc = _check(target)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rendered = _objects(target)
    assert rendered
    for obj in rendered:
        assert f"ok   {obj['kind']}/{obj['metadata']['name']}" in proc.stdout, proc.stdout


def _with_scaledobject(tmp_path: Path, base: list[dict[str, Any]], change: Any) -> Path:
    objs = copy.deepcopy(base)
    change(_one(objs, "ScaledObject", "imgq-worker"))
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(objs))
    return out


def _behavior(so: dict[str, Any]) -> dict[str, Any]:
    return dict(so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])


_TYPOS = {
    "misspelt field": lambda so: so["spec"].update(
        cooldownPeriods=so["spec"].pop("cooldownPeriod")),
    "wrong type": lambda so: so["spec"].update(pollingInterval="15s"),
    "misspelt behaviour field": lambda so: _behavior(so)["scaleDown"].update(
        stabilisationWindowSeconds=300),
    "trigger metadata not a string": lambda so: so["spec"]["triggers"][0]["metadata"].update(
        threshold=3500),
}  # fmt: skip


@pytest.mark.parametrize("typo", sorted(_TYPOS))
def test_a_typo_in_the_scaledobject_fails(
    tmp_path: Path, base: list[dict[str, Any]], typo: str
) -> None:
    """The base with one typo in its ScaledObject fails validation, naming that object and the
    field; the other objects still pass."""
    proc = _check(_with_scaledobject(tmp_path, base, _TYPOS[typo]))
    assert proc.returncode == 1, proc.stdout
    failed = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("FAIL")]
    assert len(failed) == 1 and "ScaledObject/imgq-worker" in failed[0], proc.stdout
    words = {"misspelt field": "'cooldownPeriods' was unexpected",
             "wrong type": "'15s' is not of type 'integer'",
             "misspelt behaviour field": "'stabilisationWindowSeconds' was unexpected",
             "trigger metadata not a string": "3500 is not of type 'string'"}  # fmt: skip
    assert words[typo] in proc.stdout, proc.stdout
    assert "1 failure(s)" in proc.stdout


def test_a_kind_without_a_schema_fails(tmp_path: Path, base: list[dict[str, Any]]) -> None:
    """An object no schema covers (a ServiceMonitor: its CRD's schema is not kept) is a
    failure, not a pass with a warning."""
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "imgq"},
        "spec": {"endpoints": [{"port": "metrics"}]},
    }
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all([*base, monitor]))
    proc = _check(out)
    assert proc.returncode == 1
    assert "FAIL ServiceMonitor/imgq: WARN" in proc.stdout, proc.stdout


def test_a_typo_in_a_deployment_fails(tmp_path: Path, base: list[dict[str, Any]]) -> None:
    """Kubernetes' own kinds are checked strictly too."""
    objs = copy.deepcopy(base)
    pod = _one(objs, "Deployment", "imgq-worker")["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(objs))
    proc = _check(out)
    assert proc.returncode == 1
    assert "'terminationGracePeriodSecond' was unexpected" in proc.stdout, proc.stdout


def test_strict_schema_rules() -> None:
    """scripts/crd_schema.py closes listed objects, leaves open what Kubernetes keeps open."""
    spec = importlib.util.spec_from_file_location("crd_schema", ROOT / "scripts" / "crd_schema.py")
    assert spec is not None and spec.loader is not None
    crd_schema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crd_schema)
    node = {"type": "object", "description": "x",
            "properties": {"a": {"x-kubernetes-int-or-string": True, "type": "string"},
                           "b": {"type": "object", "properties": {"c": {"type": "string"}},
                                 "x-kubernetes-preserve-unknown-fields": True},
                           "d": {"type": "object", "additionalProperties": {"type": "string"}},
                           "e": {"type": "string", "nullable": True}}}  # fmt: skip
    out = crd_schema.strict(node)
    assert out["additionalProperties"] is False and "description" not in out
    assert out["properties"]["a"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert "additionalProperties" not in out["properties"]["b"]
    assert out["properties"]["d"]["additionalProperties"] == {"type": "string"}
    assert out["properties"]["e"]["type"] == ["string", "null"]


# ----------------------------------------------------------------------------- what schemas miss


def _imgq_commands(objs: list[dict[str, Any]]) -> list[list[str]]:
    """Every imgq command line of the objects: containers' commands and exec probes."""
    found = []
    for obj in objs:
        template = obj.get("spec", {}).get("template", {})
        for c in template.get("spec", {}).get("containers", []):
            lines = [c.get("command", [])]
            lines += [c.get(p, {}).get("exec", {}).get("command", [])
                      for p in ("startupProbe", "readinessProbe", "livenessProbe")]  # fmt: skip
            found += [line for line in lines if line[:1] == ["imgq"]]
    return found


@pytest.mark.parametrize("target", [BASE, TRAIN], ids=lambda p: p.name)
def test_imgq_command_lines_parse(target: Path) -> None:
    """Each `imgq ...` of the manifests is accepted by imgq's own parser (a subcommand being
    built elsewhere is named in the skip reason)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    pending = []
    for line in _imgq_commands(_objects(target)):
        if line[1] not in sub.choices:
            pending.append(" ".join(line))
            continue
        parser.parse_args([a.replace("$(TRAIN_MODEL_NAME)", "imgq") for a in line[1:]])
    if pending:
        pytest.skip(f"imgq has no such command yet: {pending}")


@pytest.mark.parametrize("target", [BASE, EXTERNAL, TRAIN], ids=lambda p: p.name)
def test_settings_are_imgq_settings_and_secrets_come_from_secrets(target: Path) -> None:
    """Every IMGQ_* variable set is one imgq reads (a misspelt one would be ignored silently);
    the Redis password comes from a Secret and no value holds a credential."""
    objs = _objects(target)
    names = set()
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        names |= set(cm["data"])
    for obj in objs:
        for c in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for name, var in _env(c).items():
                names.add(name)
                if "PASSWORD" in name or "SECRET" in name:
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{name} is not a secret"
                value = str(var.get("value", ""))
                assert not re.search(r"://[^/@$]*:[^/@$(]+@", value), f"{name} holds a password"
    unknown = {n for n in names if n not in ENV_VARS and n not in _NOT_SETTINGS}
    assert not unknown, f"not imgq settings: {sorted(unknown)}"


def test_worker_is_locked_down_and_probed_by_imgq_health(base: list[dict[str, Any]]) -> None:
    """Non-root 10001, read-only root with /tmp writable (the model cache), startup and
    readiness from `imgq health --local` with a probe timeout beyond the command's own, and a
    liveness probe that does not depend on Redis."""
    worker = _one(base, "Deployment", "imgq-worker")
    pod = worker["spec"]["template"]["spec"]
    c = _container(worker)
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert _env(c)["IMGQ_MODEL_CACHE"]["value"].startswith("/tmp/")
    for probe in ("startupProbe", "readinessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[:3] == ["imgq", "health", "--local"], command
        own_timeout = float(command[command.index("--timeout") + 1])
        assert c[probe]["timeoutSeconds"] >= own_timeout + 5, probe
    assert "exec" not in c["livenessProbe"]
    assert c["livenessProbe"]["httpGet"]["port"] in ("metrics", 9808)
    # The bounded warm shutdown: the slowest batch at the default limits (~32 s) + 5 s.
    assert pod["terminationGracePeriodSeconds"] >= 37
    assert c["resources"]["requests"]["cpu"] == "1"
    assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == _env(c)["IMGQ_METRICS_PORT"]["value"] == "9808"


def test_scaledobject_scales_the_worker_on_backlog_and_throughput(
    base: list[dict[str, Any]], redis_server: Any
) -> None:
    """KEDA scales the worker Deployment from zero on the exporter's backlog of the configured
    queue (ready, in-flight and due tasks) and on the workers' own throughput (a rate that is 0,
    not missing, when no worker runs), and scales down more slowly than up."""
    so = _one(base, "ScaledObject", "imgq-worker")["spec"]
    assert _one(base, "Deployment", so["scaleTargetRef"]["name"])
    assert so["minReplicaCount"] == 0 and so["cooldownPeriod"] > 0
    assert {t["type"] for t in so["triggers"]} == {"prometheus"}
    by_metric = {("backlog" if "imgq_queue_backlog" in t["metadata"]["query"] else "rate"): t
                 for t in so["triggers"]}  # fmt: skip
    backlog, rate = by_metric["backlog"]["metadata"], by_metric["rate"]["metadata"]
    settings = _one(base, "ConfigMap", "imgq-settings")["data"]
    assert f'queue="{settings["IMGQ_QUEUE"]}"' in backlog["query"]
    states = re.search(r'state=~"([^"]+)"', backlog["query"])
    assert states is not None and set(states.group(1).split("|")) == {"ready", "in_flight", "due"}
    assert float(backlog["activationThreshold"]) >= 0 and backlog["ignoreNullValues"] == "false"
    # A busy worker holds a batch in hand and one taken ahead: a target below that never ends.
    assert float(backlog["threshold"]) > 2 * int(settings["IMGQ_MAX_BATCH"])
    assert metric_names(rate["query"]) <= exported_series(redis.Redis.from_url(redis_server.url))
    assert rate["query"].rstrip().endswith("or vector(0)")
    namespace = _one(base, "Deployment", "imgq-worker")["metadata"]["namespace"]
    assert f'namespace="{namespace}"' in rate["query"]
    # The throughput target is below the backlog's: a worker drains more than it is asked to
    # carry per second (80% of its rate against rate x the acceptable wait).
    assert 0 < float(rate["threshold"]) < float(backlog["threshold"])
    behavior = so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] > up["stabilizationWindowSeconds"]
    for rules in (up, down):
        assert rules["selectPolicy"] in ("Max", "Min", "Disabled")
        assert {p["type"] for p in rules["policies"]} <= {"Pods", "Percent"}


def test_selectors_and_ports_match(base: list[dict[str, Any]]) -> None:
    """Services and the PodDisruptionBudget select the pods they are for, on ports they have."""
    pods = {o["metadata"]["name"]: o for o in base if o["kind"] in ("Deployment", "StatefulSet")}

    def selected(selector: dict[str, str]) -> list[str]:
        labels = {n: o["spec"]["template"]["metadata"]["labels"] for n, o in pods.items()}
        return [n for n, have in labels.items() if selector.items() <= have.items()]

    pdb = _one(base, "PodDisruptionBudget", "imgq-worker")
    assert selected(pdb["spec"]["selector"]["matchLabels"]) == ["imgq-worker"]
    for name, owner in (("imgq-exporter", "imgq-exporter"), ("imgq-redis", "imgq-redis")):
        service = _one(base, "Service", name)
        assert selected(service["spec"]["selector"]) == [owner]
        ports = {p["name"] for p in _container(pods[owner]).get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    exporter = _one(base, "Service", "imgq-exporter")
    assert exporter["metadata"]["annotations"]["prometheus.io/port"] == "9809"
    command = _container(pods["imgq-exporter"])["command"]
    assert command == ["imgq", "exporter", "--port", "9809"]


def test_redis_keeps_what_it_is_given(base: list[dict[str, Any]]) -> None:
    """Append-only, fsync every second, noeviction, on a volume claim; the password is read
    from standard input, never on the command line."""
    redis = _one(base, "StatefulSet", "imgq-redis")
    script = " ".join(_container(redis)["command"])
    for option in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction",
                   "--maxmemory "):  # fmt: skip
        assert option in script
    assert "--requirepass" not in script and "requirepass $REDIS_PASSWORD" in script
    claims = redis["spec"]["volumeClaimTemplates"]
    assert [m["mountPath"] for m in _container(redis)["volumeMounts"] if m["name"] == "data"] == [
        "/data"
    ] and claims[0]["metadata"]["name"] == "data"


def test_external_redis_overlay_drops_the_bundled_redis() -> None:
    """The overlay has no Redis of its own, and both Deployments take the whole broker URL from
    the Secret imgq-broker."""
    objs = _objects(EXTERNAL)
    assert not [o for o in objs if o["metadata"]["name"] == "imgq-redis"]
    for name in ("imgq-worker", "imgq-exporter"):
        env = _env(_container(_one(objs, "Deployment", name)))
        assert "REDIS_PASSWORD" not in env
        assert env["IMGQ_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": "imgq-broker", "key": "url"
        }  # fmt: skip


def test_trainer_job_publishes() -> None:
    """The trainer Job trains with a model name and publishes to the queue's Redis, as the
    compose trainer does."""
    job = _one(_objects(TRAIN), "Job", "imgq-train")
    command = _container(job)["command"]
    assert command[:2] == ["imgq", "train"] and "--publish" in command and "--name" in command
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
