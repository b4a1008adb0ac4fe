"""The deployment files: docker-compose (with and without the GPU override), the Dockerfile and
Prometheus' configuration, checked without a Docker engine, plus the configuration reference.

`docker-compose config` is Debian's docker-compose 1.29.2 (`apt-get install docker-compose`), which
validates and normalises the files offline; its output is read back as JSON through the
interpreter docker-compose runs on, which ships PyYAML (imgq's own environment has no YAML parser).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from imgq.cli import build_parser
from imgq.worker.settings import ENV_VARS, WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
BASE = ["docker-compose.yml"]
WITH_GPU = ["docker-compose.yml", "docker-compose.gpu.yml"]
WORKERS = {"docker-compose.yml": ["worker"], "docker-compose.gpu.yml": ["worker", "worker-gpu"]}

_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    _COMPOSE is None,
    reason="Debian's docker-compose (1.29.2) is not installed: apt-get install -y docker-compose",
)


def _yaml_to_json(text: str) -> Any:
    """Parse YAML with the interpreter that runs docker-compose (it has PyYAML)."""
    assert _COMPOSE is not None
    interpreter = Path(_COMPOSE).read_text(errors="replace").splitlines()[0].removeprefix("#!")
    code = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    out = subprocess.run(
        [*interpreter.split(), "-c", code],
        input=text, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return json.loads(out.stdout)


def _config(files: list[str], variables: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker-compose config` of the files, as a dict, with no deployment variables set but
    ``variables`` (what an operator puts in the environment or .env)."""
    assert _COMPOSE is not None
    deployment = (
        "IMGQ_", "REDIS_", "FLOWER_", "PROMETHEUS_", "GPU_", "TRAIN_", "ALERTMANAGER_", "GRAFANA_",
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(deployment)}
    env |= variables or {}
    args = [_COMPOSE, *(a for f in files for a in ("-f", f)), "config"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"docker-compose {' '.join(files)} config failed:\n{proc.stderr}"
    return dict(_yaml_to_json(proc.stdout))


def _extras() -> dict[str, list[str]]:
    return dict(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )


def _requirements(extra: str) -> list[str]:
    """Every requirement an extra installs, following `imgq[...]` references to other extras."""
    out: list[str] = []
    for req in _extras()[extra]:
        nested = re.fullmatch(r"imgq\[([\w,\s-]+)\]", req.strip())
        if nested:
            out += [r for name in nested.group(1).split(",") for r in _requirements(name.strip())]
        else:
            out.append(req)
    return out


def _dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per FROM stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in (ln.strip() for ln in text.splitlines()):
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages and line and not line.startswith("#"):
            stages[-1].append(line)
    return stages


@needs_compose
@pytest.mark.parametrize("files", [BASE, WITH_GPU], ids=["cpu", "cpu+gpu"])
def test_compose_files_validate(files: list[str]) -> None:
    """docker-compose 1.29.2 accepts the file(s) and sees the expected services."""
    services = set(_config(files)["services"])
    expected = {"redis", "worker", "exporter", "trainer", "flower", "prometheus", "alertmanager",
                "grafana"}  # fmt: skip
    expected |= set(WORKERS[files[-1]])
    assert services == expected


@needs_compose
@pytest.mark.parametrize("files", [BASE, WITH_GPU], ids=["cpu", "cpu+gpu"])
def test_every_long_running_service_has_a_healthcheck(files: list[str]) -> None:
    """Each service that stays up has a healthcheck; only the one-shot trainer has none."""
    for name, svc in _config(files)["services"].items():
        if svc.get("restart") == "no":
            assert svc.get("profiles"), f"{name} is one-shot but not behind a profile"
            continue
        check = svc.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


@needs_compose
@pytest.mark.parametrize("files", [BASE, WITH_GPU], ids=["cpu", "cpu+gpu"])
def test_workers_scale_and_serve_read_only_models(files: list[str]) -> None:
    """Workers publish no host port and have no fixed name (so --scale works), read the model
    volume read-only, run as non-root, check their own health, and wait for a healthy Redis."""
    services = _config(files)["services"]
    for name in WORKERS[files[-1]]:
        svc = services[name]
        assert "ports" not in svc and "container_name" not in svc, name
        assert "9808" in [str(p) for p in svc["expose"]], name
        assert "imgq-workers" in svc["networks"]["default"]["aliases"], name
        assert "models:/models:ro" in svc["volumes"], name
        assert svc["user"].split(":")[0] not in ("", "0", "root"), name
        assert svc["healthcheck"]["test"][1:4] == ["imgq", "health", "--local"], name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        unknown = {k for k in svc["environment"] if k.startswith("IMGQ_")} - set(ENV_VARS)
        assert not unknown, f"{name} sets variables imgq does not read: {sorted(unknown)}"


@needs_compose
@pytest.mark.parametrize("files", [BASE, WITH_GPU], ids=["cpu", "cpu+gpu"])
def test_workers_follow_the_queues_published_version(files: list[str]) -> None:
    """Every worker, CPU and GPU, is given no model folder: it serves its queue's published
    stable version and follows its rollouts, fetched into a cache on its tmpfs (a worker
    pinned to /models/current serves whatever was trained last, promoted or not)."""
    services = _config(files)["services"]
    for name in WORKERS[files[-1]]:
        svc = services[name]
        pinned = svc["environment"].get("IMGQ_MODEL")
        assert pinned is None, f"{name} serves the folder {pinned}, not the published version"
        settings = WorkerSettings.from_env(svc["environment"])
        assert settings.model_dir is None and settings.model_version is None, name
        assert "/tmp" in svc["tmpfs"] and settings.model_cache.is_relative_to("/tmp"), name


@needs_compose
def test_trainer_is_one_shot_and_writes_the_shared_volume() -> None:
    """The trainer runs only under the `train` profile and writes where the workers read."""
    trainer = _config(BASE)["services"]["trainer"]
    assert trainer["profiles"] == ["train"]
    assert trainer["command"][:2] == ["imgq", "train"]
    assert trainer["command"][trainer["command"].index("--out") + 1] == "/models/current"
    assert trainer["command"][-1] == "--publish"  # then published for the workers to follow
    assert trainer["environment"]["IMGQ_BROKER_URL"] == "redis://redis:6379/0"
    assert trainer["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "models:/models:rw" in trainer["volumes"]
    assert trainer["build"]["args"]["IMGQ_EXTRAS"] == "trainer"


@needs_compose
@pytest.mark.parametrize(
    ("variables", "name"), [({}, "imgq"), ({"TRAIN_MODEL_NAME": "shapes"}, "shapes")]
)
def test_trainer_names_the_model_as_the_operator_says(variables: dict[str, str], name: str) -> None:
    """The trainer passes `--name`: TRAIN_MODEL_NAME, else `imgq`. Without it `imgq train`
    names the model after its data folder, which is the mount point `/data` for every model
    compose trains."""
    command = _config(BASE, variables)["services"]["trainer"]["command"]
    assert command[0] == "imgq"
    given = build_parser().parse_args(command[1:]).name
    assert given == name, f"{command} names the model {given or 'data (its data folder)'}"


@needs_compose
def test_redis_persists_queued_tasks() -> None:
    """Redis writes an append-only file to a named volume and never evicts queued tasks."""
    redis = _config(BASE)["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "redis-data:/data:rw" in redis["volumes"]


@needs_compose
@pytest.mark.parametrize("files", [BASE, WITH_GPU], ids=["cpu", "cpu+gpu"])
def test_worker_images_carry_no_tensorflow(files: list[str]) -> None:
    """Worker images install an extra without TensorFlow; the trainer's extra has it."""
    services = _config(files)["services"]
    for name in WORKERS[files[-1]]:
        extra = services[name]["build"]["args"]["IMGQ_EXTRAS"]
        assert extra in ("worker", "gpu"), name
        assert not [r for r in _requirements(extra) if r.lower().startswith("tensorflow")], name
    assert any(r.startswith("tensorflow") for r in _requirements("trainer"))


@needs_compose
def test_build_extras_are_defined_in_pyproject() -> None:
    """Every IMGQ_EXTRAS the compose files build with is an extra of pyproject.toml."""
    services = _config(WITH_GPU)["services"]
    used = {s["build"]["args"]["IMGQ_EXTRAS"] for s in services.values() if "build" in s}
    assert used == {"worker", "gpu", "trainer"}
    assert used <= set(_extras())


def test_dockerfile_installs_like_the_docs() -> None:
    """The build stage runs the documented `pip install ".[EXTRAS]"`, defaulting to `worker`."""
    build, final = _dockerfile_stages()
    assert "ARG IMGQ_EXTRAS=worker" in build
    installs = [ln for ln in build if "pip install" in ln]
    assert len(installs) == 1 and 'pip install ".[${IMGQ_EXTRAS}]"' in installs[0]
    assert 'pip install ".[worker]"' in (ROOT / "docs" / "operations.md").read_text()
    assert "worker" in _extras()


def test_dockerfile_final_stage_is_slim_and_non_root() -> None:
    """Pinned base, final stage copies the venv only (no pip, no compiler), runs as non-root
    and checks its own health."""
    build, final = _dockerfile_stages()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base.group(1))
    text = "\n".join(final)
    assert "COPY --from=build /opt/imgq /opt/imgq" in text
    assert not re.search(r"pip install|apt-get install|gcc|build-essential", text)
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    health = [ln for ln in final if ln.startswith("HEALTHCHECK")]
    assert health and '"imgq", "health", "--local"' in health[0]
    assert "pip uninstall -y pip" in " ".join(build)


@pytest.mark.parametrize(
    "dockerfile", sorted((ROOT / "docker").glob("Dockerfile*")), ids=lambda p: p.name
)
def test_dockerfiles_need_no_registry_but_their_base_images(dockerfile: Path) -> None:
    """A build needs the FROM base images and nothing else from a registry: no `# syntax=`
    parser directive (BuildKit, the compose plugin's default builder, pulls that frontend image
    on every build), and every COPY --from, RUN --mount from= and FROM that is not the pinned
    base names an earlier stage; ADD fetches no URL."""
    lines = re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines()
    directives = []
    for line in lines:  # parser directives: `# key=value` lines before anything else
        found = re.fullmatch(r"#\s*([A-Za-z]+)\s*=\s*(.*?)\s*", line)
        if not found:
            break
        directives.append(found.group(1).lower())
    assert "syntax" not in directives, f"{dockerfile.name}: a `# syntax=` directive pulls an image"
    bases = set(re.findall(r"^ARG\s+(\w+_IMAGE)=\S+$", dockerfile.read_text(), re.MULTILINE))
    stages: list[str] = []
    for line in (ln.strip() for ln in lines):
        words = line.split()
        if not words or line.startswith("#"):
            continue
        instruction = words[0].upper()
        if instruction == "FROM":
            image = next(w for w in words[1:] if not w.startswith("--"))
            assert image in stages or image.strip("${}") in bases, f"FROM {image}: not pinned"
            stages += [words[-1]] if words[-2].upper() == "AS" else []
        sources = re.findall(r"--from=([^\s,]+)", line)  # COPY --from=, RUN --mount=...,from=
        sources += re.findall(r"--mount=\S*?\bfrom=([^\s,]+)", line)
        for source in sources:
            assert source in stages, f"{line!r} reads {source!r}, which is no earlier stage"
        if instruction == "ADD":
            assert not re.search(r"\b(?:https?|git)://|\bgit@", line), f"{line!r} fetches a URL"
    assert stages, f"{dockerfile.name} has no named build stage"


@needs_compose
def test_prometheus_scrapes_every_worker_replica() -> None:
    """Prometheus discovers workers by the DNS alias every worker carries, on the metrics port."""
    conf = _yaml_to_json((ROOT / "docker" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in conf["scrape_configs"]}
    dns = jobs["imgq-worker"]["dns_sd_configs"][0]
    assert dns["names"] == ["imgq-workers"] and dns["type"] == "A"
    assert str(dns["port"]) == ENV_VARS["IMGQ_METRICS_PORT"][0]
    assert _config(BASE)["services"]["worker"]["environment"]["IMGQ_METRICS_PORT"] == "9808"


@needs_compose
def test_the_exporter_runs_without_a_model_and_is_scraped() -> None:
    """The backlog exporter runs the workers' image as `imgq exporter`: no model, no volume, no
    host port, the port IMGQ_EXPORTER_PORT defaults to, healthy once it reads the backlog;
    Prometheus scrapes it by name (one replica, however many workers)."""
    services = _config(BASE)["services"]
    exporter, worker = services["exporter"], services["worker"]
    assert exporter["image"] == worker["image"] and exporter["build"] == worker["build"]
    assert exporter["command"] == ["imgq", "exporter"]
    assert "volumes" not in exporter and "ports" not in exporter
    settings = WorkerSettings.from_env(exporter["environment"])
    assert settings.model_dir is None
    port = str(settings.exporter_port)
    assert port == ENV_VARS["IMGQ_EXPORTER_PORT"][0] and [str(p) for p in exporter["expose"]] == [
        port
    ]
    assert "imgq_queue_backlog{" in " ".join(exporter["healthcheck"]["test"])
    assert exporter["depends_on"]["redis"]["condition"] == "service_healthy"
    conf = _yaml_to_json((ROOT / "docker" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in conf["scrape_configs"]}
    assert jobs["imgq-exporter"]["static_configs"][0]["targets"] == [f"exporter:{port}"]


@needs_compose
@pytest.mark.parametrize("variables", [{}, {"IMGQ_QUEUE": "main", "GPU_QUEUE": "fast"}])
def test_the_exporter_reads_every_queue_a_worker_serves(variables: dict[str, str]) -> None:
    """With the GPU override, the exporter reads the GPU workers' queue beside the CPU
    workers' own: every queue a worker of the stack serves has its backlog exported."""
    services = _config(WITH_GPU, variables)["services"]
    command = services["exporter"]["command"]
    args = build_parser().parse_args(command[1:])
    served = {WorkerSettings.from_env(services[name]["environment"]).queue
              for name in WORKERS["docker-compose.gpu.yml"]}  # fmt: skip
    assert command[:2] == ["imgq", "exporter"] and set(args.queue) == served


@needs_compose
def test_alerting_services_are_pinned_provisioned_and_wired() -> None:
    """Prometheus loads the alert rules and sends to Alertmanager; Alertmanager and Grafana
    run pinned images with their configuration mounted read-only and publish on loopback by
    default; Grafana's data source points at Prometheus."""
    services = _config(BASE)["services"]
    for name, svc in services.items():
        if "build" not in svc:
            image = svc["image"]
            assert re.search(r":v?\d+\.\d+\.\d+", image) and "latest" not in image, name
    prometheus = services["prometheus"]
    assert "./docker/alert-rules.yml:/etc/prometheus/alert-rules.yml:ro" in [
        v.replace(str(ROOT), ".") for v in prometheus["volumes"]
    ]
    conf = _yaml_to_json((ROOT / "docker" / "prometheus.yml").read_text())
    assert conf["rule_files"] == ["alert-rules.yml"]
    targets = conf["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]
    volumes = {
        name: [v.replace(str(ROOT), ".") for v in services[name]["volumes"]]
        for name in ("alertmanager", "grafana")
    }
    assert (
        "./docker/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in volumes["alertmanager"]
    )
    assert "./docker/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes["grafana"]
    assert "./docker/grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes["grafana"]
    assert services["alertmanager"]["ports"] == ["127.0.0.1:9093:9093/tcp"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000/tcp"]
    provisioning = ROOT / "docker" / "grafana" / "provisioning"
    source = _yaml_to_json((provisioning / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


def _documented_variables(doc: str) -> list[tuple[str, str, str]]:
    """Rows `| `IMGQ_X` | default | meaning |` of a document's configuration reference section."""
    text = (ROOT / doc).read_text()
    section = text.split("\n## Configuration reference\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(IMGQ_\w+)` \| (.*?) \| (.*?) \|$", section, re.MULTILINE)
    return [(name, default, meaning) for name, default, meaning in rows]


@pytest.mark.parametrize("doc", ["docs/operations.md", "README.md"])
def test_configuration_reference_matches_settings(doc: str) -> None:
    """The README and docs/operations.md list every IMGQ_* variable with the default and meaning
    that worker/settings.py defines, in its order (the message shows the table to paste)."""
    expected = [(name, default, meaning) for name, (default, meaning) in ENV_VARS.items()]
    table = "\n".join(f"| `{n}` | {d} | {m} |" for n, d, m in expected)
    assert _documented_variables(doc) == expected, f"regenerate the table in {doc}:\n{table}"
