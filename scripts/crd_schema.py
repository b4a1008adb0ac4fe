"""A CustomResourceDefinition's openAPIV3Schema as a strict JSON schema, for
``scripts/check_kubernetes.py`` (check-jsonschema validates the custom resources against it).

Kubernetes' own schemas come with kubernetes-validate; those of custom resources (KEDA's
ScaledObject) are kept in deploy/kubernetes/schemas/, made by this script from the CRD, the way
kubeconform's openapi2jsonschema makes them:

- every object that lists its properties and neither allows others (``additionalProperties``)
  nor keeps unknown fields (``x-kubernetes-preserve-unknown-fields``) gets
  ``additionalProperties: false``: the API server's strict field validation (the default of
  ``kubectl apply`` since Kubernetes 1.27) refuses an unknown field, so a misspelt one fails here;
- ``x-kubernetes-int-or-string`` becomes integer or string, ``nullable`` adds null;
- ``apiVersion`` and ``kind`` must be the CRD's own.

    .venv/bin/python scripts/crd_schema.py CRD.yaml VERSION --source "where it came from" > OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strict(node: Any) -> Any:
    """A copy of an OpenAPI v3 schema node with the rules above applied, recursively."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items() if key != "description"}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    keeps_unknown = out.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not keeps_unknown:
        out["additionalProperties"] = False
    return out


def schema_of(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    """The strict JSON schema of ``version`` of ``crd``."""
    spec = crd["spec"]
    served = {v["name"]: v for v in spec["versions"]}
    if version not in served:
        raise SystemExit(f"crd_schema: {crd['metadata']['name']} has no version {version!r}; "
                         f"it has {sorted(served)}")  # fmt: skip
    schema = strict(served[version]["schema"]["openAPIV3Schema"])
    api_version = f"{spec['group']}/{version}"
    schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
    schema["properties"]["kind"] = {"type": "string", "enum": [spec["names"]["kind"]]}
    schema["required"] = sorted({"apiVersion", "kind", *schema.get("required", [])})
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": f"{spec['names']['kind']} {api_version}",
        "$comment": f"Made by scripts/crd_schema.py from {source}",
        **schema,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", type=Path, help="the CustomResourceDefinition, YAML")
    parser.add_argument("version", help="the served version, e.g. v1alpha1")
    parser.add_argument("--source", required=True, help="where the CRD came from (recorded)")
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    json.dump(schema_of(crd, args.version, args.source), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
