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
newest of them. A cluster that cannot take the pack exits 3 with its Placed condition's message.

A file that cannot be read, is not YAML, or holds something other than Kubernetes objects of the
kind asked for exits 2 with one line naming the file and what is wrong, as a usage error does.

Host paths are refused unless allowed, as by the operator: `--model-host-path-prefix` and
`--engine-cache-host-path` stand for the chart's `hostPaths.modelPrefixes` and
`exporter.engineCacheHostPath`; `--engine-uid` for its `engine.uid`.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import yaml
from kubernetes.utils import parse_quantity
from pydantic import ValidationError

from slmpack.api.models import SLMDeploymentStatus, SLMProfileSpec, SLMProfileStatus
from slmpack.core import conditions as cond
from slmpack.core.decide import ClusterSnapshot, Decision, decide, with_status
from slmpack.core.manifests import DEFAULT_ENGINE_UID, PROFILE_KEY_LABEL, engine_uid_setting
from slmpack.core.validation import NO_HOST_PATHS, GPUNode, HostPathPolicy

MAX_ROUNDS = 3
RENDER_UID = "00000000-0000-0000-0000-000000000000"
DEFAULT_NAMESPACE = "default"

RENDERED, REFUSED, BAD_INPUT, UNPLACEABLE = 0, 1, 2, 3
EXIT_CODES = f"""exit codes:
  {RENDERED}  rendered: the objects, then the SLMDeployment with its status, on stdout
  {REFUSED}  the operator would refuse the spec: its InvalidSpec message on stderr
  {BAD_INPUT}  bad usage or input: a file that cannot be read, is not YAML, or holds no object of the
     kind asked for, or one without the fields it needs; one line on stderr names the file and the fault
  {UNPLACEABLE}  the spec is valid, but the cluster described cannot take it (no resource.k8s.io version
     or DRA device): its Placed message on stderr"""


class BadInput(Exception):
    """An input file the operator's objects cannot be read from; the message is one line."""


class Dumper(yaml.SafeDumper):
    """Plain YAML, as kubectl prints it: a dict used twice is written twice, not as an anchor."""

    def ignore_aliases(self, data) -> bool:
        return True


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_CODES
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
    parser.add_argument("--model-host-path-prefix", action="append", default=[], metavar="DIR",
                        help="a node directory under which spec.model.volume.hostPath may point, as the chart's "
                             "hostPaths.modelPrefixes (repeatable; default none)")
    parser.add_argument("--engine-cache-host-path", default=None, metavar="DIR",
                        help="the node directory allowed as spec.engine.cache.hostPath, as the chart's "
                             "exporter.engineCacheHostPath (default none)")
    parser.add_argument("--engine-uid", default="", metavar="UID",
                        help=f"the UID and GID the engines and profilers run as, as the chart's engine.uid "
                             f"(default {DEFAULT_ENGINE_UID})")
    parser.add_argument("--namespace", "-n", default=None,
                        help=f"the namespace, when the SLMDeployment names none (default {DEFAULT_NAMESPACE})")


def load_documents(path: Path) -> list[dict]:
    """The objects in a YAML file, `kind: List` unwrapped; BadInput when it holds anything else."""
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: cannot be read: {getattr(error, 'strerror', None) or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInput(f"{path}: not YAML: {getattr(error, 'problem', None) or error}{where}") from None
    objects = []
    for number, document in enumerate(documents, 1):
        if document is None:
            continue
        items = [document]
        if isinstance(document, dict) and str(document.get("kind", "")).endswith("List"):
            items = document.get("items") or []
            if not isinstance(items, list):
                raise BadInput(f"{path}: document {number} is a {document['kind']} whose items are not a list")
        for item in items:
            if not isinstance(item, dict):
                raise BadInput(f"{path}: document {number} holds a {_shape(item)}, not a Kubernetes object "
                               "(a mapping with apiVersion, kind and metadata)")
        objects += items
    return objects


SHAPES = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}


def _shape(value) -> str:
    return SHAPES.get(type(value), type(value).__name__)


def _name(obj: dict) -> str:
    """metadata.name, which every object read here needs."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) or not metadata["name"]:
        raise BadInput(f"the {obj.get('kind') or 'object'} has no metadata.name: give it one")
    return metadata["name"]


def node_from_object(obj: dict) -> GPUNode:
    """A Node object as the API shows it, read the way the operator's adapter reads it."""
    name = _name(obj)
    status, labels = obj.get("status") or {}, obj["metadata"].get("labels") or {}
    allocatable = (status.get("allocatable") or {}) if isinstance(status, dict) else None
    if not isinstance(labels, dict) or not isinstance(allocatable, dict):
        raise BadInput(f"Node {name}: metadata.labels and status.allocatable must be mappings")
    amounts = {}
    for resource, quantity in allocatable.items():
        try:
            amounts[resource] = int(parse_quantity(quantity))
        except (ValueError, TypeError):
            raise BadInput(f"Node {name}: status.allocatable.{resource} is {quantity!r}, not a quantity") from None
    taints = (obj.get("spec") or {}).get("taints") or []
    if not isinstance(taints, list) or not all(isinstance(t, dict) for t in taints):
        raise BadInput(f"Node {name}: spec.taints must be a list of taints")
    return GPUNode(name=name, labels=dict(labels), allocatable=amounts, taints=list(taints))


def stored(model, raw, where: str):
    """`raw` parsed as the operator parses what the API stored; BadInput naming each field that is wrong."""
    if raw is not None and not isinstance(raw, dict):
        raise BadInput(f"{where} is a {_shape(raw)}, not a mapping")
    try:
        return model.from_stored(raw)
    except ValidationError as error:
        raise BadInput("; ".join(f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())) \
            from None


def profile_as_stored(profile: dict, namespace: str) -> dict:
    """A profile file as the API would hold it: in the namespace, with a uid and its key label,
    which is how deployments find a profile measured under their conditions."""
    name = _name(profile)
    key = stored(SLMProfileSpec, profile.get("spec"), f"SLMProfile {name}: spec").conditions.key()
    stored(SLMProfileStatus, profile.get("status"), f"SLMProfile {name}: status")
    metadata = {"namespace": namespace, "uid": RENDER_UID, **profile["metadata"]}
    metadata["labels"] = {PROFILE_KEY_LABEL: key, **(metadata.get("labels") or {})}
    return {**profile, "metadata": metadata}


def objects_of(paths: list[Path], kind: str, read=lambda obj: obj) -> list:
    """The objects of `kind` in the files, each read by `read`; BadInput names the file of a bad one."""
    found = []
    for path in paths:
        for obj in load_documents(path):
            if obj.get("kind") == kind:
                try:
                    found.append(read(obj))
                except BadInput as error:
                    raise BadInput(f"{path}: {error}") from None
    return found


def render(deployment: dict, nodes: list[GPUNode], profiles: list[dict], now: datetime,
           api_versions: tuple[str, ...] = (), slices: tuple[dict, ...] = (),
           host_paths: HostPathPolicy = NO_HOST_PATHS,
           engine_uid: int = DEFAULT_ENGINE_UID) -> tuple[list[dict], Decision]:
    """The objects the operator would create or apply, in order, and its last decision."""
    profiles = [dict(p) for p in profiles]
    objects: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(MAX_ROUNDS):
        # Shown as it stands once the routers are ready: the Service selects them.
        decision = decide(deployment, ClusterSnapshot(nodes=tuple(nodes), profiles=tuple(profiles),
                                                      resource_api_versions=api_versions, resource_slices=slices,
                                                      routers_ready=1),
                          now, host_paths=host_paths, engine_uid=engine_uid)
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
    try:
        given, deployment, nodes, profiles, slices, api_versions = read_inputs(args)
    except BadInput as error:
        print(f"slmpack render: {error}", file=sys.stderr)
        return BAD_INPUT
    try:
        host_paths = HostPathPolicy(tuple(args.model_host_path_prefix), args.engine_cache_host_path)
        engine_uid = engine_uid_setting(args.engine_uid)
    except ValueError as error:
        print(f"slmpack render: {error}", file=sys.stderr)
        return BAD_INPUT
    objects, decision = render(deployment, nodes, profiles, datetime.now(UTC), api_versions, slices, host_paths,
                               engine_uid)
    refused = cond.get_condition(decision.status.conditions, cond.INVALID_SPEC)
    if refused is not None and refused.status == "True":
        print(refused.message, file=sys.stderr)
        return REFUSED
    unplaced = cond.get_condition(decision.status.conditions, cond.PLACED)
    if decision.outcome == "waiting" and unplaced is not None:
        # The cluster cannot take the pack (no DRA API or driver): the condition says what is missing.
        print(unplaced.message, file=sys.stderr)
        return UNPLACEABLE
    yaml.dump_all(objects + [with_status(given, decision.status)], sys.stdout, Dumper=Dumper, sort_keys=False)
    return RENDERED


def read_inputs(args: argparse.Namespace):
    """The SLMDeployment as given and as the apiserver would hold it, and the cluster the files describe."""
    given = next(iter(load_documents(args.filename)), None)
    if not given or given.get("kind") != "SLMDeployment":
        raise BadInput(f"{args.filename}: no SLMDeployment in it (its first document must be one)")
    try:
        _name(given)
        stored(SLMDeploymentStatus, given.get("status"), "status")
    except BadInput as error:
        raise BadInput(f"{args.filename}: {error}") from None
    given["metadata"] = dict(given["metadata"])
    given["metadata"].setdefault("namespace", args.namespace or DEFAULT_NAMESPACE)
    # As the apiserver would hold it: with a uid for its children's ownerReferences, at generation 1.
    metadata = {"uid": RENDER_UID, "generation": 1, **given["metadata"]}
    deployment = {**given, "metadata": metadata}
    nodes = objects_of(args.node, "Node", node_from_object)
    profiles = objects_of(args.profile, "SLMProfile", lambda p: profile_as_stored(p, metadata["namespace"]))
    slices = tuple(objects_of(args.resource_slice, "ResourceSlice", _with_api_version))
    if args.api_versions is not None:
        api_versions = tuple(v.strip() for v in args.api_versions.split(",") if v.strip())
    else:
        api_versions = tuple(sorted({s["apiVersion"] for s in slices}))
    return given, deployment, nodes, profiles, slices, api_versions


def _with_api_version(obj: dict) -> dict:
    if not isinstance(obj.get("apiVersion"), str):
        raise BadInput(f"ResourceSlice {_name(obj)} has no apiVersion: give the one kubectl printed")
    return obj
