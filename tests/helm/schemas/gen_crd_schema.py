#!/usr/bin/env python3
"""Turn a CustomResourceDefinition's openAPIV3Schema into a strict JSON schema (draft 2020-12).

    python tests/helm/schemas/gen_crd_schema.py kubeflow.org_pytorchjobs.yaml \
        > tests/helm/schemas/pytorchjob-kubeflow.org-v1.json

What changes on the way (so the schema validates like the API server, plus typo checks):

* ``description`` texts are dropped (they are 3/4 of the size);
* ``nullable: true`` becomes a ``"null"`` alternative of the type;
* ``x-kubernetes-*`` markers are dropped; ``x-kubernetes-preserve-unknown-fields`` objects accept
  any field, every other object with ``properties`` gets ``additionalProperties: false``
  (the API server would silently prune an unknown field; here a misspelt field fails);
* the root pins ``apiVersion`` (group/version) and ``kind``, and requires both.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            continue
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: convert(sub) for name, sub in value.items()}
        else:
            out[key] = convert(value)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd", help="the CRD YAML file")
    parser.add_argument("--version", help="which served version (default: the storage version)")
    args = parser.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(open(args.crd)) if d]
    crd = next((d for d in docs if d.get("kind") == "CustomResourceDefinition"), None)
    if crd is None:
        parser.error(f"{args.crd}: no CustomResourceDefinition")
    spec = crd["spec"]
    versions = spec["versions"]
    chosen = next((v for v in versions if (v["name"] == args.version if args.version else v.get("storage"))), None)
    if chosen is None:
        parser.error(f"{args.crd}: no version {args.version!r}; has {[v['name'] for v in versions]}")
    schema = convert(chosen["schema"]["openAPIV3Schema"])
    group_version = f"{spec['group']}/{chosen['name']}"
    schema["properties"]["apiVersion"] = {"const": group_version}
    schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind"})
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema",
           "title": f"{spec['names']['kind']} {group_version} (from CRD {crd['metadata']['name']})", **schema}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
