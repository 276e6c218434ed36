"""`slmpack render`: what the operator would create for an SLMDeployment on given Nodes, without a cluster.

Like `helm template`: the same pure decision the operator runs (`core.decide.decide`), on a
snapshot read from files instead of the API. The objects it would create come first, as
multi-document YAML, then the SLMDeployment with the status it would write. A spec the
operator refuses exits 1 with the message its InvalidSpec condition carries.

Without a Ready profile the operator first creates the SLMProfile, and once it exists the
profiling Job; render does the same two rounds, giving the new profile a placeholder uid
as the apiserver would give it a real one.

For placement dra, `--resource-slice` gives the devices NVIDIA's DRA driver publishes and
`--api-versions` the resource.k8s.io versions the cluster serves; the claims come out in the
newest of them. A cluster that cannot take the pack exits 1 with its Placed condition's message.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import yaml
from kubernetes.utils import parse_quantity

from slmpack.api.models import SLMProfileSpec
from slmpack.core import conditions as cond
from slmpack.core.decide import ClusterSnapshot, Decision, decide, with_status
from slmpack.core.manifests import PROFILE_KEY_LABEL
from slmpack.core.validation import GPUNode

MAX_ROUNDS = 3
RENDER_UID = "00000000-0000-0000-0000-000000000000"
DEFAULT_NAMESPACE = "default"


class Dumper(yaml.SafeDumper):
    """Plain YAML, as kubectl prints it: a dict used twice is written twice, not as an anchor."""

    def ignore_aliases(self, data) -> bool:
        return True


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, type=Path, metavar="SLMDEPLOYMENT.yaml",
                        help="the SLMDeployment to render")
    parser.add_argument("--node", action="append", default=[], type=Path, metavar="NODE.yaml",
                        help="a Node as `kubectl get node -o yaml` prints it (repeatable; a List works too)")
    parser.add_argument("--profile", action="append", default=[], type=Path, metavar="SLMPROFILE.yaml",
                        help="an SLMProfile with its status, as if it existed in the namespace (repeatable)")
    parser.add_argument("--resource-slice", action="append", default=[], type=Path, metavar="SLICE.yaml",
                        help="a ResourceSlice as `kubectl get resourceslice -o yaml` prints it, for placement dra "
                             "(repeatable; a List works too)")
    parser.add_argument("--api-versions", default=None, metavar="resource.k8s.io/v1beta1,...",
                        help="the resource.k8s.io versions the cluster serves, comma-separated "
                             "(default: those of the --resource-slice files)")
    parser.add_argument("--namespace", "-n", default=None,
                        help=f"the namespace, when the SLMDeployment names none (default {DEFAULT_NAMESPACE})")


def load_documents(path: Path) -> list[dict]:
    """The objects in a YAML file, `kind: List` unwrapped."""
    objects = []
    for document in yaml.safe_load_all(path.read_text()):
        if not document:
            continue
        objects += document.get("items", []) if document.get("kind", "").endswith("List") else [document]
    return objects


def node_from_object(obj: dict) -> GPUNode:
    """A Node object as the API shows it, read the way the operator's adapter reads it."""
    allocatable = (obj.get("status") or {}).get("allocatable") or {}
    return GPUNode(name=obj["metadata"]["name"], labels=dict(obj["metadata"].get("labels") or {}),
                   allocatable={k: int(parse_quantity(v)) for k, v in allocatable.items()})


def profile_as_stored(profile: dict, namespace: str) -> dict:
    """A profile file as the API would hold it: in the namespace, with a uid and its key label,
    which is how deployments find a profile measured under their conditions."""
    metadata = {"namespace": namespace, "uid": RENDER_UID, **profile["metadata"]}
    key = SLMProfileSpec.from_stored(profile.get("spec")).conditions.key()
    metadata["labels"] = {PROFILE_KEY_LABEL: key, **(metadata.get("labels") or {})}
    return {**profile, "metadata": metadata}


def render(deployment: dict, nodes: list[GPUNode], profiles: list[dict], now: datetime,
           api_versions: tuple[str, ...] = (), slices: tuple[dict, ...] = ()) -> tuple[list[dict], Decision]:
    """The objects the operator would create or apply, in order, and its last decision."""
    profiles = [dict(p) for p in profiles]
    objects: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(MAX_ROUNDS):
        decision = decide(deployment, ClusterSnapshot(nodes=tuple(nodes), profiles=tuple(profiles),
                                                      resource_api_versions=api_versions, resource_slices=slices),
                          now)
        created = False
        for obj in decision.create + decision.apply:
            key = (obj["kind"], obj["metadata"]["name"])
            if key in seen:
                continue
            seen.add(key)
            objects.append(obj)
            if obj["kind"] == "SLMProfile":
                # As the apiserver would: the profile now exists, with a uid its Job can point at.
                profiles.append({**obj, "metadata": {**obj["metadata"], "uid": RENDER_UID}})
                created = True
        if not created:
            break
        deployment = with_status(deployment, decision.status)
    return objects, decision


def run(args: argparse.Namespace) -> int:
    given = next(iter(load_documents(args.filename)), None)
    if not given or given.get("kind") != "SLMDeployment":
        print(f"{args.filename}: no SLMDeployment in it", file=sys.stderr)
        return 2
    given["metadata"] = dict(given.get("metadata") or {})
    given["metadata"].setdefault("namespace", args.namespace or DEFAULT_NAMESPACE)
    # As the apiserver would hold it: with a uid for its children's ownerReferences, at generation 1.
    metadata = {"uid": RENDER_UID, "generation": 1, **given["metadata"]}
    deployment = {**given, "metadata": metadata}
    nodes = [node_from_object(o) for path in args.node for o in load_documents(path) if o.get("kind") == "Node"]
    profiles = [profile_as_stored(p, metadata["namespace"])
                for path in args.profile for p in load_documents(path) if p.get("kind") == "SLMProfile"]

    slices = tuple(s for path in args.resource_slice for s in load_documents(path) if s.get("kind") == "ResourceSlice")
    if args.api_versions is not None:
        api_versions = tuple(v.strip() for v in args.api_versions.split(",") if v.strip())
    else:
        api_versions = tuple(sorted({s["apiVersion"] for s in slices}))
    objects, decision = render(deployment, nodes, profiles, datetime.now(UTC), api_versions, slices)
    refused = cond.get_condition(decision.status.conditions, cond.INVALID_SPEC)
    if refused is not None and refused.status == "True":
        print(refused.message, file=sys.stderr)
        return 1
    unplaced = cond.get_condition(decision.status.conditions, cond.PLACED)
    if decision.outcome == "waiting" and unplaced is not None:
        # The cluster cannot take the pack (no DRA API or driver): the condition says what is missing.
        print(unplaced.message, file=sys.stderr)
        return 1
    yaml.dump_all(objects + [with_status(given, decision.status)], sys.stdout, Dumper=Dumper, sort_keys=False)
    return 0
