"""The operator's only Kubernetes client code: server-side apply, create-if-absent, reads, events.

Desired objects come from the pure manifest builders; this module only sends them.
Server-side apply (beta and on by default since Kubernetes 1.18) makes every write a
declaration of the whole desired object, so reconciling twice changes nothing.

Every request has a timeout (the client's `_request_timeout`): a call that hangs would hold a
reconcile worker, or a Lease renewal past its deadline.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from prometheus_client import Counter
from urllib3 import Retry

from slmpack import API_GROUP, API_VERSION
from slmpack.core.manifests import controlled_by

FIELD_MANAGER = "slmpack"
log = logging.getLogger(__name__)
API_REQUESTS = Counter("slmpack_operator_api_requests_total",
                       "Requests the operator sent to the Kubernetes API (watches excluded), by verb.", ["verb"])
# (connect, read) seconds of a request that names no timeout of its own.
REQUEST_TIMEOUT_SECONDS = (5.0, 30.0)
# A connection that fails is tried again; a request that timed out is not, or a timeout would last
# four times as long (urllib3's default retries reads too).
RETRIES = Retry(total=3, read=0)


def delete_as_read(delete, obj: dict, propagation_policy: str | None = None) -> None:
    """Delete `obj` as it was read: its uid is a precondition, so a successor of the same name survives. Gone
    already (404) or replaced since (409) is left to the next reconcile."""
    meta = obj["metadata"]
    try:
        delete(meta["name"], meta["namespace"], body=client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=meta["uid"]), propagation_policy=propagation_policy))
    except ApiException as error:
        if error.status not in (404, 409):
            raise


class CountingApiClient(client.ApiClient):
    """The client library's ApiClient, counting each request it sends and giving each a timeout."""

    def __init__(self, configuration: client.Configuration | None = None,
                 request_timeout: float | tuple[float, float] = REQUEST_TIMEOUT_SECONDS) -> None:
        configuration = configuration or client.Configuration.get_default_copy()
        if configuration.retries is None:
            configuration.retries = RETRIES
        super().__init__(configuration)
        self.request_timeout = request_timeout

    def call_api(self, method, url, *args, **kwargs):
        API_REQUESTS.labels(method).inc()
        # Generated and dynamic clients alike pass `_request_timeout`, None unless the call set one.
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self.request_timeout
        return super().call_api(method, url, *args, **kwargs)


class Conflict(Exception):
    """The object changed since it was read (HTTP 409): read it again and retry."""


class FieldConflict(Exception):
    """A server-side apply without force met fields that another field manager set to other values."""


class NameTaken(Exception):
    """An object of the desired one's name exists and is not controlled by the desired one's owner."""

    def __init__(self, kind: str, name: str):
        super().__init__(f"{kind} {name} exists and is not controlled by this deployment")
        self.kind, self.name = kind, name


def load_config(connections: int | None = None) -> client.ApiClient:
    """In-cluster credentials when running in a pod, the kubeconfig otherwise; up to `connections`
    kept open for threads that call the API at once."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # Read KUBECONFIG now: the client library captured it when first imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    configuration = client.Configuration.get_default_copy()
    if connections:
        configuration.connection_pool_maxsize = connections
    return CountingApiClient(configuration)


def absent_as_none(read):
    """The object `read()` returns, or None when the API answers 404."""
    try:
        return read()
    except ApiException as error:
        if error.status == 404:
            return None
        raise


@dataclass
class Kube:
    api: client.ApiClient

    @cached_property
    def dynamic(self) -> DynamicClient:
        return DynamicClient(self.api)

    @cached_property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @cached_property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @cached_property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def _resource(self, obj: dict):
        return self.dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])

    def apply(self, obj: dict) -> dict:
        """Server-side apply of the whole desired object. One with a controller reference first goes without
        forcing. Merged with fields another writer set, it may conflict with them or be invalid (a Service's
        unnamed port beside its own). Then the object is read: one its controller controls is applied over by
        force (a `kubectl scale` of a child is undone); one it does not, which the label-selected watches never
        see, raises NameTaken instead of being adopted."""
        meta = obj["metadata"]
        owner = next((ref["uid"] for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None)
        try:
            return self._server_side_apply(obj, force=owner is None)
        except FieldConflict:  # only without force, so with an owner
            self._refuse_unless_controlled(obj, owner)
            return self._server_side_apply(obj, force=True)
        except ApiException as error:
            if owner is not None and error.status == 422:
                self._refuse_unless_controlled(obj, owner)
            raise

    def _refuse_unless_controlled(self, obj: dict, owner: str) -> None:
        """Raise NameTaken when an object of `obj`'s name exists and `owner` does not control it."""
        meta = obj["metadata"]
        try:
            found = self._resource(obj).get(name=meta["name"], namespace=meta.get("namespace")).to_dict()
        except ApiException as error:
            if error.status == 404:
                return
            raise
        if not controlled_by(found, owner):
            raise NameTaken(obj["kind"], meta["name"])

    def _server_side_apply(self, obj: dict, force: bool) -> dict:
        meta = obj["metadata"]
        try:
            # serialize=False: the reply's JSON as it is, not the dynamic client's object tree (costly
            # for a StatefulSet, at a thousand deployments).
            result = self._resource(obj).server_side_apply(
                body=obj, name=meta["name"], namespace=meta.get("namespace"),
                field_manager=FIELD_MANAGER, force_conflicts=True if force else None, serialize=False)
        except ApiException as error:
            if error.status == 409 and _field_conflict(error):
                raise FieldConflict(f"{obj['kind']} {meta.get('namespace')}/{meta['name']}: {error.body}") from None
            if error.status == 409:  # another writer created it between this apply's read and its create
                raise Conflict(f"{obj['kind']} {meta.get('namespace')}/{meta['name']}: {error.reason}") from None
            raise
        return json.loads(result.data)

    def create_if_absent(self, obj: dict) -> dict | None:
        """Create the object unless one of that name exists; the created object, or None when it existed.

        A deterministic name plus create makes "exactly one" hold across operator restarts:
        the apiserver refuses the second create with 409.
        """
        meta = obj["metadata"]
        try:
            return self._resource(obj).create(body=obj, namespace=meta.get("namespace")).to_dict()
        except ApiException as error:
            if error.status == 409:
                return None
            raise

    def post_event(self, involved: dict, reason: str, message: str, warning: bool = False) -> None:
        """An Event on `involved` (an object as the API returns it), as `kubectl describe` shows them."""
        meta, now = involved["metadata"], datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.core.create_namespaced_event(meta["namespace"], {
            "metadata": {"generateName": f"{meta['name'][:200]}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": involved["apiVersion"], "kind": involved["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": FIELD_MANAGER}, "reportingComponent": FIELD_MANAGER,
        }, _preload_content=False)

    def patch_deployment_status(self, namespace: str, name: str, status: dict, resource_version: str) -> str:
        """Write the status computed from the object at `resource_version`; returns the new resourceVersion.

        The resourceVersion is a precondition: if the object changed since it was read, the
        apiserver answers 409 and this raises Conflict, so a slower writer never overwrites a
        newer status."""
        try:
            written = self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, "slmdeployments", name,
                {"metadata": {"resourceVersion": resource_version}, "status": status})
        except ApiException as error:
            if error.status == 409:
                raise Conflict(f"SLMDeployment {namespace}/{name} changed since resourceVersion "
                               f"{resource_version}") from None
            raise
        return written["metadata"]["resourceVersion"]

    def add_profile_user(self, profile: dict, owner_reference: dict) -> None:
        """Add a deployment to a profile's owners, so the profile goes when its last user goes.

        The first user writes the list conditionally on the resourceVersion; later ones append to
        it with a JSON patch, which the apiserver applies atomically, so hundreds of deployments
        sharing one profile add themselves without conflicts and without dropping each other.
        """
        meta = profile["metadata"]
        owners = list(meta.get("ownerReferences") or [])
        if any(o["uid"] == owner_reference["uid"] for o in owners):
            return
        if owners:
            patch, kind = [{"op": "add", "path": "/metadata/ownerReferences/-", "value": owner_reference}], "json"
        else:
            patch, kind = ({"metadata": {"ownerReferences": [owner_reference],
                                         "resourceVersion": meta["resourceVersion"]}}, "merge")
        try:
            self.custom.patch_namespaced_custom_object(
                API_GROUP, API_VERSION, meta["namespace"], "slmprofiles", meta["name"], patch,
                _content_type=f"application/{kind}-patch+json", _preload_content=False)
        except ApiException as error:
            if error.status == 409:
                raise Conflict(f"SLMProfile {meta['namespace']}/{meta['name']} changed; adding its user again") \
                    from None
            raise

    # ---------------------------------------------------------------- leader election

    @cached_property
    def coordination(self) -> client.CoordinationV1Api:
        return client.CoordinationV1Api(self.api)

    def get_lease(self, namespace: str, name: str, timeout_seconds: float | None = None) -> client.V1Lease | None:
        return absent_as_none(lambda: self.coordination.read_namespaced_lease(
            name, namespace, _request_timeout=timeout_seconds))

    def write_lease(self, lease: client.V1Lease, timeout_seconds: float | None = None) -> bool:
        """Create the Lease, or replace it at the resourceVersion it was read at; False when another
        writer came first (409). `timeout_seconds` bounds the request (the renew deadline's rest)."""
        meta = lease.metadata
        try:
            if meta.resource_version:
                self.coordination.replace_namespaced_lease(meta.name, meta.namespace, lease,
                                                           _request_timeout=timeout_seconds)
            else:
                self.coordination.create_namespaced_lease(meta.namespace, lease, _request_timeout=timeout_seconds)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise

    def get_profile(self, namespace: str, name: str) -> dict | None:
        """The SLMProfile through its status subresource, which is all the profiler's role may read."""
        return absent_as_none(lambda: self.custom.get_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, "slmprofiles", name))

    def patch_profile_status(self, namespace: str, name: str, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, "slmprofiles", name, {"status": status})

    # ---------------------------------------------------------------- the exporters' GPU assignments

    def list_config_maps(self, namespace: str, selector: str) -> tuple[list[dict], str]:
        """The ConfigMaps with this label selector, and the resourceVersion of the list."""
        listed = self.api.sanitize_for_serialization(
            self.core.list_namespaced_config_map(namespace, label_selector=selector))
        return listed.get("items") or [], listed["metadata"]["resourceVersion"]

    def watch_config_maps(self, namespace: str, selector: str, resource_version: str,
                          timeout_s: int) -> Iterator[tuple[str, dict]]:
        """(ADDED | MODIFIED | DELETED, ConfigMap) after `resource_version`, for up to `timeout_s`; an
        expired version raises ApiException (410 Gone), and the caller lists again."""
        for event in watch.Watch().stream(self.core.list_namespaced_config_map, namespace, label_selector=selector,
                                          resource_version=resource_version, timeout_seconds=timeout_s,
                                          _request_timeout=timeout_s + 10):
            yield event["type"], self.api.sanitize_for_serialization(event["object"])

    # ---------------------------------------------------------------- DRA (resource.k8s.io)

    def served_versions(self, group: str) -> list[str]:
        """The `group/version`s the apiserver serves for `group`, from discovery."""
        groups = client.ApisApi(self.api).get_api_versions().groups or []
        return [v.group_version for g in groups if g.name == group for v in g.versions]

    def resource_slices(self, api_version: str, driver: str) -> list[dict]:
        """The driver's ResourceSlices on every node."""
        group, version = api_version.split("/")
        return self.custom.list_cluster_custom_object(
            group, version, "resourceslices", field_selector=f"spec.driver={driver}")["items"]

    def resource_claims(self, api_version: str, namespace: str, selector: dict[str, str]) -> list[dict]:
        group, version = api_version.split("/")
        labels = ",".join(f"{k}={v}" for k, v in selector.items())
        items = self.custom.list_namespaced_custom_object(
            group, version, namespace, "resourceclaims", label_selector=labels)["items"]
        # Items of a list carry no apiVersion or kind; the delete needs the version they were read in.
        return [{**item, "apiVersion": api_version, "kind": "ResourceClaim"} for item in items]

    def delete_statefulset(self, statefulset: dict) -> None:
        """Delete a StatefulSet as read; its pods go by garbage collection, gracefully: each runs its preStop
        drain before the engine stops."""
        delete_as_read(self.apps.delete_namespaced_stateful_set, statefulset, "Background")

    def delete_deployment(self, deployment: dict) -> None:
        """Delete a Deployment (a router) as read; its pods go by garbage collection."""
        delete_as_read(self.apps.delete_namespaced_deployment, deployment, "Background")

    @cached_property
    def networking(self) -> client.NetworkingV1Api:
        return client.NetworkingV1Api(self.api)

    def delete_network_policy(self, policy: dict) -> None:
        """Delete a NetworkPolicy as read."""
        delete_as_read(self.networking.delete_namespaced_network_policy, policy)

    def delete_unused_claim(self, claim: dict) -> bool:
        """Delete a claim as it was read; True when deleted. The preconditions make the delete fail (409) if
        the claim changed since, e.g. the scheduler reserved it for a pod: the next reconcile looks again."""
        group, version = claim["apiVersion"].split("/")
        meta = claim["metadata"]
        try:
            self.custom.delete_namespaced_custom_object(
                group, version, meta["namespace"], "resourceclaims", meta["name"],
                body={"preconditions": {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]}})
            return True
        except ApiException as error:
            if error.status in (404, 409):
                return False
            raise


def _field_conflict(error: ApiException) -> bool:
    """Whether a 409 is server-side apply's conflict with another field manager (a Status cause whose `reason`,
    StatusCause's type, is FieldManagerConflict), not a create that lost a race."""
    try:
        causes = (json.loads(error.body or "{}").get("details") or {}).get("causes") or []
    except ValueError:
        return False
    return any(cause.get("reason") == "FieldManagerConflict" for cause in causes)
