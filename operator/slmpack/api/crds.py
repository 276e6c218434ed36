"""Generate the CustomResourceDefinitions from the pydantic models.

`slmpack crds` prints them; `slmpack crds --write DIR...` writes one file per CRD.
The schema is made structural: references inlined, titles dropped, `Optional[X]`
collapsed to a nullable X, `const` turned into a one-value enum, `replicas` marked
int-or-string, map key patterns left to the operator, and nested objects defaulted to `{}` so
that their own defaults apply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from slmpack import API_GROUP, API_VERSION
from slmpack.api.models import SLMDeploymentSpec, SLMDeploymentStatus, SLMProfileSpec, SLMProfileStatus

DROPPED_KEYS = {"title", "examples", "additionalProperties_forbidden"}


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one pydantic JSON schema node into a structural OpenAPI v3 node."""
    node = dict(schema)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
        return structural(node, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        nullable = len(branches) < len(node["anyOf"])
        if len(branches) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            merged = structural({**branches[0], **rest}, defs)
            if nullable:
                merged["nullable"] = True
            if merged.get("default", 0) is None:
                del merged["default"]
            return merged
        types = sorted(b.get("type", "string") for b in branches)
        if types == ["integer", "string"]:
            # int-or-string (replicas: "auto" or a count). Kubernetes allows no typed branches
            # here, so value checks sit at the top: `pattern` binds strings, the bounds integers.
            rest = {k: v for k, v in node.items() if k not in {"anyOf", "title"}}
            number, word = (structural(b, defs) for b in sorted(branches, key=lambda b: b["type"]))
            checks = {k: number[k] for k in ("minimum", "maximum") if k in number}
            return {"x-kubernetes-int-or-string": True, "pattern": "^(" + "|".join(word["enum"]) + ")$",
                    **checks, **rest}
        raise ValueError(f"no structural form for anyOf {types}")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("format") == "date-time":
        node["type"] = "string"
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROPPED_KEYS or key == "$defs":
            continue
        if key == "properties":
            out[key] = {name: _with_object_default(structural(sub, defs)) for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            continue  # `false` may not sit beside `properties`; the apiserver prunes unknown fields.
        elif key == "patternProperties":
            # Structural schemas have no key patterns, and a CEL rule matching every key of an
            # unbounded map exceeds the apiserver's cost budget: the values' schema stays here,
            # and the operator's parse checks the keys (InvalidSpec).
            (values,) = value.values()
            out["additionalProperties"] = structural(values, defs)
        elif key == "default" and value in ("", None):
            continue  # the 1.20 apiserver rejects empty-string defaults as null
        else:
            out[key] = value
    return out


def _with_object_default(node: dict[str, Any]) -> dict[str, Any]:
    # A nested object whose fields all have defaults gets `default: {}` so that the
    # apiserver fills those defaults in even when the user leaves the object out.
    if node.get("type") == "object" and "properties" in node and "default" not in node \
            and not node.get("nullable") and not node.get("required"):
        return {**node, "default": {}}
    return node


def openapi_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def _column(name: str, path: str, kind: str = "string", description: str = "", priority: int = 0) -> dict:
    column = {"name": name, "type": kind, "jsonPath": path, "description": description}
    if priority:
        column["priority"] = priority
    return column


AGE = _column("Age", ".metadata.creationTimestamp", "date", "Time since creation.")


def crd(kind: str, plural: str, short: str, spec: type, status: type, description: str,
        columns: list[dict], subresources: dict | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}", "labels": {"app.kubernetes.io/part-of": "slmpack"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": [short], "categories": ["slmpack"]},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": subresources or {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string", "description": "The API version: slmpack.dev/v1alpha1."},
                        "kind": {"type": "string", "description": f"The kind: {kind}."},
                        "metadata": {"type": "object"},
                        "spec": openapi_schema(spec),
                        "status": openapi_schema(status),
                    },
                }},
            }],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [
        crd("SLMDeployment", "slmdeployments", "slmd", SLMDeploymentSpec, SLMDeploymentStatus,
            "SLMDeployment serves a small language model with replicas packed onto shared GPUs, "
            "sized from a measured SLMProfile.",
            [_column("Model", ".spec.model.name", description="The model served."),
             _column("GPU", ".spec.gpu.product", description="The GPU product."),
             _column("Ready", ".status.readyReplicas", "integer", "Replicas ready."),
             _column("Planned", ".status.replicas", "integer", "Replicas planned."),
             _column("Packs", ".status.currentPacks", "integer", "Packs (GPUs) running."),
             _column("Knee", ".status.plan.kneeBatchSize", "integer", "The knee batch size."),
             _column("Tok/s", ".status.plan.predictedThroughputTokensPerS", "number",
                     "Predicted aggregate output tokens per second."),
             _column("Phase", ".status.phase", description="A one-word summary of the conditions."),
             AGE],
            # `kubectl scale`, HPA and KEDA count packs: each is spec.replicas replicas on one GPU.
            {"status": {}, "scale": {"specReplicasPath": ".spec.packs", "statusReplicasPath": ".status.currentPacks",
                                     "labelSelectorPath": ".status.selector"}}),
        crd("SLMProfile", "slmprofiles", "slmp", SLMProfileSpec, SLMProfileStatus,
            "SLMProfile holds a measured throughput/latency curve of a model on a GPU and engine, its knee "
            "and the replication measurements. Deployments with the same conditions reuse it.",
            [_column("Model", ".spec.conditions.model", description="The model profiled."),
             _column("GPU", ".spec.conditions.gpuProduct", description="The GPU product."),
             _column("Knee", ".status.knee.batchSize", "integer", "The knee batch size."),
             _column("Tok/s", ".status.knee.throughputTokensPerS", "number", "Output tokens/s at the knee."),
             _column("Replicas", ".status.recommendedReplicas", "integer", "Recommended replicas per GPU."),
             _column("Gain%", ".status.replicationGainPercent", "number",
                     "The best k > 1 over one replica at the same load."),
             _column("Dtype", ".status.dtype", description="The dtype measured."),
             _column("Step", ".status.profilingPhase", description="The profiler's current step."),
             _column("Probes", ".status.progress.probesDone", "integer", "Probes measured so far."),
             _column("Planned", ".status.progress.probesPlanned", "integer", "Probes expected in all."),
             _column("ETA(s)", ".status.progress.etaSeconds", "integer", "Estimated seconds left."),
             _column("Phase", ".status.phase", description="Pending, Profiling, Ready or Failed, from the conditions."),
             AGE]),
    ]


def render(crds: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(c, sort_keys=False, width=120) for c in crds)


def filename(crd_object: dict[str, Any]) -> str:
    return f"{crd_object['metadata']['name']}.yaml"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", nargs="+", metavar="DIR", type=Path,
                        help="write one YAML file per CRD into each DIR instead of printing")


def run(args: argparse.Namespace) -> int:
    crds = all_crds()
    if not args.write:
        sys.stdout.write(render(crds))
        return 0
    for directory in args.write:
        directory.mkdir(parents=True, exist_ok=True)
        for c in crds:
            (directory / filename(c)).write_text(render([c]))
    return 0
