"""kopf handlers: watch caches in, one reconcile per deployment at a time, status out.

The control loop follows controller-runtime's:

- kopf's indices are the watch caches: deployments, profiles, profiling Jobs, engine pods,
  GPU nodes and the children. A reconcile reads its snapshot from them, not from LIST calls.
- Events only add the deployment's key to a work queue (`workqueue.py`), so a burst of pod
  or Job events coalesces into one reconcile, and a key is never reconciled by two workers
  at once.
- A worker decides with the pure core (`core/decide.py`), acts through the adapter, and
  writes the status with the resourceVersion its snapshot was read at: on a conflict it
  requeues instead of overwriting a newer status.
- Reconcile is level-triggered and idempotent: children are server-side applied, the
  profile and its Job are created by deterministic name, so an operator killed at any point
  converges when it (or another replica) starts again. With several replicas, a Lease
  elects the one that acts (`leader.py`).

No kopf state handlers (on.create/update) are used, so kopf writes nothing onto the objects
and nothing blocks their deletion while the operator is down.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import kopf
from kubernetes.utils import parse_quantity
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from slmpack import API_GROUP, API_VERSION
from slmpack.adapters.engine_metrics import EngineMetricsReader
from slmpack.adapters.kube import Conflict, Kube, NameTaken, load_config
from slmpack.api.models import DEFAULT_CPU_ENGINE_IMAGE, DEFAULT_ENGINE_IMAGE, AutoscalingSpec, SLMDeploymentStatus
from slmpack.controller.gpu_assignments import GpuAssignments
from slmpack.controller.leader import LeaderElection
from slmpack.controller.workqueue import Retry, WorkQueue, work
from slmpack.core import conditions as cond
from slmpack.core import dra
from slmpack.core.decide import ClusterSnapshot, Decision, ProfilingJob, decide, with_status
from slmpack.core.manifests import (
    DEFAULT_ENGINE_UID,
    DEPLOYMENT_LABEL,
    DISRUPTION_BUDGET_API_VERSION,
    POD_WATCH_SELECTOR,
    PROFILE_LABEL,
    EngineImages,
    engine_uid_setting,
    label_value,
    network_policy_peer,
    selector_labels,
)
from slmpack.core.router import (
    DEFAULT_AGENT_IMAGE,
    DEFAULT_ROUTER_IMAGE,
    ROUTER_CLUSTER_ROLE,
    ROUTER_LABEL,
    RouterImages,
)
from slmpack.core.router import METRICS_PORT as ROUTER_METRICS_PORT
from slmpack.core.validation import GPUNode, HostPathPolicy

PROFILER_CLUSTER_ROLE = os.environ.get("SLMPACK_PROFILER_CLUSTER_ROLE", "slmpack-profiler")
# What the routers run (HAProxy, and the agent: this operator's image) and the ClusterRole bound to them.
ROUTER_IMAGES = RouterImages(os.environ.get("SLMPACK_ROUTER_IMAGE", DEFAULT_ROUTER_IMAGE),
                             os.environ.get("SLMPACK_ROUTER_AGENT_IMAGE", DEFAULT_AGENT_IMAGE))
ROUTER_ROLE = os.environ.get("SLMPACK_ROUTER_CLUSTER_ROLE", ROUTER_CLUSTER_ROLE)
# "NAMESPACE/NAME" of the Lease that elects the acting replica (the chart always sets it); unset runs
# without election, for an operator run by hand next to no other.
LEADER_LEASE = os.environ.get("SLMPACK_LEADER_ELECTION_LEASE", "")
# The node directories deployments may mount (the chart's hostPaths.modelPrefixes, `:`-separated, and
# exporter.engineCacheHostPath), read when the operator starts; unset allows none.
MODEL_HOST_PATH_PREFIXES_ENV = "SLMPACK_MODEL_HOST_PATH_PREFIXES"
ENGINE_CACHE_HOST_PATH_ENV = "SLMPACK_ENGINE_CACHE_HOST_PATH"
# Reconciles at once (of different deployments). They mostly wait on the apiserver, so they run
# in threads of their own, not in the event loop's small default pool.
WORKERS = int(os.environ.get("SLMPACK_WORKERS", "16"))
# The namespace where the nodes' exporters publish which GPUs each engine pod got (the release's);
# read at startup. Unset: the replicas' GPUs are not known.
GPU_ASSIGNMENTS_NAMESPACE = "SLMPACK_GPU_ASSIGNMENTS_NAMESPACE"
# The engine images of deployments that name none (the chart's engine.image and engine.cpuImage).
ENGINE_IMAGE_ENV = "SLMPACK_ENGINE_IMAGE"
CPU_ENGINE_IMAGE_ENV = "SLMPACK_CPU_ENGINE_IMAGE"
# The UID and GID of the engines and profilers (the chart's engine.uid); unset is the images' own, 10001.
ENGINE_UID_ENV = "SLMPACK_ENGINE_UID"
# Where the operator's own pods run and their labels ("k=v,k=v"), for the engines' NetworkPolicy to admit them.
OPERATOR_NAMESPACE_ENV = "SLMPACK_OPERATOR_NAMESPACE"
OPERATOR_POD_LABELS_ENV = "SLMPACK_OPERATOR_POD_LABELS"
# A decision that creates the profile needs its uid for the Job: decide again after creating, a few times at most.
MAX_ROUNDS = 3
# While a profile is measured, look again now and then even if no event comes (a missed watch event).
PROFILING_RESYNC_SECONDS = 60
CONFLICT_RETRY_SECONDS = 0.2
# A create found its object there already: the watch cache is behind, look again shortly.
CACHE_BEHIND_RETRY_SECONDS = 1.0
# Events that announce an object the decision creates: posted only by the reconcile that created it.
CREATION_EVENTS = {"ProfileCreated": "SLMProfile", "ProfilingStarted": "Job"}

RECONCILES = Counter("slmpack_operator_reconciles_total", "SLMDeployment reconciles, by outcome.", ["outcome"])
ERRORS = Counter("slmpack_operator_errors_total", "Reconciles that raised an unexpected error.")
CONFLICTS = Counter("slmpack_operator_conflicts_total", "Writes refused because the object had changed (409).")
RECONCILE_SECONDS = Histogram("slmpack_operator_reconcile_duration_seconds", "Time of one reconcile.",
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
SCALING_DECISIONS = Counter("slmpack_operator_scaling_decisions_total",
                            "The autoscaler's decisions, by direction (up, down, none) and reason.",
                            ["direction", "reason"])
PROFILING_SECONDS = Histogram("slmpack_operator_profiling_duration_seconds",
                              "Time from a profile's creation to its measurement, seen when it becomes ready.",
                              buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200))

log = logging.getLogger(__name__)

# The label selectors the apiserver filters the watches by. kopf's `labels=` on a handler filters on the
# client, after every object of the kind crossed the wire and was parsed; these make the LIST and WATCH
# themselves selective (kopf's settings.watching.label_selectors), so the operator holds and parses
# slmpack's objects only, however many others the cluster runs. One selector per resource, so every pod
# the operator follows carries one common label (core/manifests.py).
WATCH_LABEL_SELECTORS = {
    ("", "v1", "pods"): POD_WATCH_SELECTOR,
    ("apps", "v1", "statefulsets"): DEPLOYMENT_LABEL,
    ("apps", "v1", "deployments"): DEPLOYMENT_LABEL,  # the routers
    ("", "v1", "services"): DEPLOYMENT_LABEL,
    ("batch", "v1", "jobs"): PROFILE_LABEL,
    ("networking.k8s.io", "v1", "networkpolicies"): DEPLOYMENT_LABEL,
    ("policy", "poddisruptionbudgets"): DEPLOYMENT_LABEL,
}
# Initial lists come in pages of this many objects, never all at once.
LIST_CHUNK_SIZE = 500


def watch_selectively(settings: kopf.OperatorSettings) -> None:
    for resource, selector in WATCH_LABEL_SELECTORS.items():
        settings.watching.label_selectors[resource] = selector
    settings.watching.chunk_size = LIST_CHUNK_SIZE


# ---------------------------------------------------------------- the watch caches (kopf indices)


def stored(body: kopf.Body) -> dict:
    """The object as the API returned it, detached from kopf's view."""
    return json.loads(json.dumps({k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec", "status")
                                  if body.get(k) is not None}))


@kopf.index(API_GROUP, API_VERSION, "slmdeployments")
async def deployment_index(namespace, name, body, **_):
    return {(namespace, name): stored(body)}


@kopf.index(API_GROUP, API_VERSION, "slmdeployments")
async def deployments_by_profile(namespace, name, status, **_):
    # Under None: deployments whose status names no profile yet, such as one that has just
    # created its profile and not yet recorded it.
    return {(namespace, status.get("profile")): name}


@kopf.index(API_GROUP, API_VERSION, "slmdeployments")
async def deployments_by_label(namespace, name, **_):
    # Children's labels carry the name cut to 63 characters with a hash; this maps it back.
    return {(namespace, label_value(name)): name}


@kopf.index(API_GROUP, API_VERSION, "slmprofiles")
async def profile_index(namespace, body, **_):
    return {namespace: stored(body)}


@kopf.index("batch", "v1", "jobs", labels={PROFILE_LABEL: kopf.PRESENT})
async def job_index(namespace, body, **_):
    return {namespace: stored(body)}


@kopf.index("", "v1", "pods", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def pod_index(namespace, labels, body, **_):
    return {(namespace, labels[DEPLOYMENT_LABEL]): replica_state(body)}


@kopf.index("", "v1", "nodes")
async def node_index(body, spec, **_):
    return None if spec.get("unschedulable") else {None: gpu_node(body)}


# The children the operator follows, to skip applying what did not change: a StatefulSet by its
# generation (its status changes with every replica), a Service by its resourceVersion.
CHILD_VERSIONS = {"StatefulSet": ("statefulset_index", "generation"), "Service": ("service_index", "resourceVersion"),
                  "PodDisruptionBudget": ("engine_policy_index", "generation"),
                  "NetworkPolicy": ("engine_policy_index", "generation")}


@kopf.index("apps", "v1", "statefulsets", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def statefulset_index(namespace, name, meta, **_):
    return {("StatefulSet", namespace, name): meta.get("generation")}


@kopf.index("", "v1", "services", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def service_index(namespace, name, meta, **_):
    return {("Service", namespace, name): meta.get("resourceVersion")}


# The disruption budget in the version the apiserver prefers (policy/v1beta1 before Kubernetes 1.21).
@kopf.index("policy", None, "poddisruptionbudgets", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def engine_policy_index(namespace, name, meta, body, **_):
    return {(body["kind"], namespace, name): meta.get("generation")}


@kopf.index("apps", "v1", "statefulsets", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def packs_by_deployment(namespace, name, uid, labels, meta, spec, **_):
    """The packs' StatefulSets of each deployment: one no longer wanted is deleted; one kept keeps its
    (immutable) pod management policy."""
    return {(namespace, labels[DEPLOYMENT_LABEL]): {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "ownerReferences": owners(meta)},
        "spec": {"podManagementPolicy": spec.get("podManagementPolicy")}}}


@kopf.index("networking.k8s.io", "v1", "networkpolicies", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def network_policies_by_deployment(namespace, name, uid, labels, meta, **_):
    """The engines' NetworkPolicy of each deployment: deleted when spec.networkPolicy is removed."""
    return {(namespace, labels[DEPLOYMENT_LABEL]): {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "ownerReferences": owners(meta)}}}


def owners(meta) -> list[dict]:
    """The owner references, so that only what a deployment controls is deleted as its child."""
    return json.loads(json.dumps(list(meta.get("ownerReferences") or [])))


@kopf.index("apps", "v1", "deployments", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def routers_by_deployment(namespace, labels, status, **_):
    """The ready router pods of each deployment: its Service selects them once there is one."""
    return {(namespace, labels[DEPLOYMENT_LABEL]): status.get("readyReplicas") or 0}


@kopf.index("apps", "v1", "deployments", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def router_deployments(namespace, name, uid, labels, meta, **_):
    """The router Deployment of each deployment: deleted once its spec.routing leaves router mode."""
    return {(namespace, labels[DEPLOYMENT_LABEL]): {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": name, "namespace": namespace, "uid": uid, "ownerReferences": owners(meta)}}}


@kopf.index("", "v1", "pods", labels={ROUTER_LABEL: kopf.PRESENT})
async def router_pod_index(namespace, name, labels, status, **_):
    """The ready router pods of each deployment and their IPs, where the autoscaler reads the router's queue."""
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if not ready or not status.get("podIP"):
        return None
    return {(namespace, labels[ROUTER_LABEL]): (name, status["podIP"])}


@kopf.index("", "v1", "pods", labels={PROFILE_LABEL: kopf.PRESENT, "job-name": kopf.PRESENT})
async def profiler_pod_index(namespace, labels, status, **_):
    """Why each profiler pod ended (OOMKilled, Error and its exit code), by Job."""
    ended = [s["state"]["terminated"] for s in status.get("containerStatuses") or []
             if (s.get("state") or {}).get("terminated")]
    if not ended:
        return None
    why = ", ".join(f"{t.get('reason') or 'Error'} (exit code {t.get('exitCode')})" for t in ended)
    return {(namespace, labels["job-name"]): why}


def profiling_job(job: dict, pod_endings: tuple[str, ...] = ()) -> ProfilingJob:
    status = job.get("status") or {}
    conditions = status.get("conditions") or []
    failed = next((c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"), None)
    complete = any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)
    message = (failed.get("message") or failed.get("reason") or "") if failed else ""
    if failed and pod_endings:
        message += f"; its pods ended with {', '.join(sorted(set(pod_endings)))}"
    completed_at = status.get("completionTime") if complete else None
    return ProfilingJob(name=job["metadata"]["name"], failed=failed is not None, failure_message=message,
                        completed_at=datetime.fromisoformat(completed_at.replace("Z", "+00:00"))
                        if completed_at else None)


def replica_state(pod: dict) -> cond.ReplicaState:
    status, meta = pod.get("status") or {}, pod["metadata"]
    statuses = status.get("containerStatuses") or []
    engine = next((s for s in statuses if s.get("name") == "engine"), statuses[0] if statuses else None)
    spec = pod.get("spec") or {}
    port = (meta.get("annotations") or {}).get("prometheus.io/port", "")
    where = {"node": spec.get("nodeName"), "ip": status.get("podIP"), "uid": meta.get("uid", ""),
             "metrics_port": int(port) if port.isdigit() else None,
             "claims": tuple(c["resourceClaimName"] for c in spec.get("resourceClaims") or []
                             if c.get("resourceClaimName"))}
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {})
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        where["unschedulable"] = scheduled.get("message") or "the scheduler gives no reason"
    if engine is None:
        return cond.ReplicaState(name=meta["name"], ready=False, **where)
    waiting = (engine.get("state") or {}).get("waiting") or {}
    terminated = (engine.get("lastState") or {}).get("terminated") or {}
    return cond.ReplicaState(name=meta["name"], ready=bool(engine.get("ready")), waiting_reason=waiting.get("reason"),
                             last_termination_reason=terminated.get("reason"),
                             restarts=engine.get("restartCount") or 0, **where)


def gpu_node(node: dict) -> GPUNode:
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    return GPUNode(name=node["metadata"]["name"], labels=dict(node["metadata"].get("labels") or {}),
                   allocatable={k: int(parse_quantity(v)) for k, v in allocatable.items()},
                   taints=list((node.get("spec") or {}).get("taints") or []))


# ---------------------------------------------------------------- the controller


Key = tuple[str, str]  # (namespace, name) of an SLMDeployment


@dataclass
class Controller:
    """The work queue, its workers, and what they read: kopf's indices."""

    kube: Kube
    indices: dict
    queue: WorkQueue = field(default_factory=lambda: WorkQueue(base_delay=0.05))
    leader: LeaderElection | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    threads: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(WORKERS, "reconcile"))
    # What was last applied per child, and the version the apply returned: an unchanged desired
    # object over an unchanged child is not sent again.
    applied: dict[tuple, tuple[str, str | int]] = field(default_factory=dict)
    # The resourceVersion of each deployment's last status write, to know its echo from the watch.
    written: dict[Key, str] = field(default_factory=dict)
    # (profile uid, deployment uid) pairs this operator added as profile users.
    users_added: set[tuple[str, str]] = field(default_factory=set)
    # The engines' load, read in the background: a reconcile takes the latest readings, never waits on an engine.
    engines: EngineMetricsReader = field(default_factory=EngineMetricsReader)
    gpus: GpuAssignments | None = None
    host_paths: HostPathPolicy = field(default_factory=HostPathPolicy)
    # The NetworkPolicy peer of the operator's own pods, when the chart tells where they run.
    operator_peer: dict | None = None
    disruption_budget_api_version: str = DISRUPTION_BUDGET_API_VERSION
    engine_images: EngineImages = field(default_factory=EngineImages)
    engine_uid: int = DEFAULT_ENGINE_UID

    def start(self) -> None:
        may_work = self.leader.wait_to_lead if self.leader else None
        self.tasks = [asyncio.create_task(work(self.queue, self.reconcile, may_work)) for _ in range(WORKERS)]
        self.engines.on_first_reading = self.queue.add
        self.tasks.append(asyncio.create_task(self.engines.run()))
        if self.leader:
            self.tasks.append(asyncio.create_task(self.leader.run()))
        if self.gpus:
            self.gpus.start(asyncio.get_running_loop())

    def gpus_changed(self, uids: set[str]) -> None:
        """Reconcile the deployments whose pods got other GPUs (or none) in the exporters' assignments."""
        for key, replicas in self.indices["pod_index"].items():
            if any(replica.uid in uids for replica in replicas):
                for name in self.all("deployments_by_label", key):
                    self.queue.add((key[0], name))

    async def stop(self) -> None:
        if self.gpus:
            self.gpus.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.leader and self.leader.leading.is_set():
            await asyncio.to_thread(self.leader.release)
        self.threads.shutdown(wait=False, cancel_futures=True)

    # ---- reading the caches (in the event loop, where kopf updates them)

    def one(self, index: str, key):
        store = self.indices[index].get(key)
        return next(iter(store), None) if store else None

    def all(self, index: str, key) -> tuple:
        store = self.indices[index].get(key)
        return tuple(store) if store else ()

    def queue_profile_users(self, namespace: str, profile: str) -> None:
        # A deployment's status names its profile only after the reconcile that created it, and a
        # profile can become Ready before that write is seen: queue those without a profile too.
        for deployment in (*self.all("deployments_by_profile", (namespace, profile)),
                           *self.all("deployments_by_profile", (namespace, None))):
            self.queue.add((namespace, deployment))

    def snapshot(self, namespace: str, name: str) -> ClusterSnapshot:
        return ClusterSnapshot(
            nodes=self.all("node_index", None),
            profiles=self.all("profile_index", namespace),
            jobs=tuple(profiling_job(j, self.all("profiler_pod_index", (namespace, j["metadata"]["name"])))
                       for j in self.all("job_index", namespace)),
            pods=with_gpus(self.all("pod_index", (namespace, label_value(name))),
                           self.gpus.by_uid if self.gpus else {}, self.gpus.running_by_uid if self.gpus else {}),
            statefulsets=self.all("packs_by_deployment", (namespace, label_value(name))),
            routers_ready=sum(self.all("routers_by_deployment", (namespace, label_value(name)))),
            router_pods=tuple(pod for pod, _ in self.all("router_pod_index", (namespace, label_value(name)))),
            routers=self.all("router_deployments", (namespace, label_value(name))),
            network_policies=self.all("network_policies_by_deployment", (namespace, label_value(name))),
            operator_peer=self.operator_peer,
            disruption_budget_api_version=self.disruption_budget_api_version,
        )

    def with_engine_loads(self, key: Key, body: dict, snapshot: ClusterSnapshot) -> ClusterSnapshot:
        """With spec.autoscaling, the snapshot plus its engines' latest readings; the reader follows the
        engines that are ready now."""
        try:
            policy = AutoscalingSpec.model_validate((body.get("spec") or {}).get("autoscaling"))
        except ValidationError:  # off, or invalid: the decision says so
            self.engines.forget(key)
            return snapshot
        routers = {pod: f"http://{ip}:{ROUTER_METRICS_PORT}/metrics"
                   for pod, ip in self.all("router_pod_index", (key[0], label_value(key[1])))}
        self.engines.follow(key, {**metrics_targets(body, snapshot), **routers}, policy.period_seconds)
        loads, problems = self.engines.latest(key)
        return replace(snapshot, engine_loads=loads, engine_problems=problems)

    # ---- one reconcile

    async def reconcile(self, key: Key) -> float | None:
        body = self.one("deployment_index", key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.engines.forget(key)
            return None  # gone: its children go by garbage collection
        started = time.monotonic()
        snapshot = self.with_engine_loads(key, body, self.snapshot(*key))
        try:
            decision, look_again = await asyncio.get_running_loop().run_in_executor(
                self.threads, self.reconcile_once, body, snapshot)
        except Conflict as error:
            CONFLICTS.inc()
            raise Retry(str(error)) from None
        except Exception:
            ERRORS.inc()
            raise
        finally:
            RECONCILE_SECONDS.observe(time.monotonic() - started)
        if look_again:
            return look_again
        if decision.outcome == "profiling":
            return decision.retry_after_seconds or PROFILING_RESYNC_SECONDS
        return decision.retry_after_seconds

    def reconcile_once(self, body: dict, snapshot: ClusterSnapshot) -> tuple[Decision, float | None]:
        """Decide and act, again while acting created objects the decision depends on (the profile's
        uid); then write the status, conditionally on the resourceVersion the decision read, and
        post its Events once it is written. With the decision: how soon to look again, when the
        profile still lacks this deployment as a user (a concurrent writer came first) or a create
        found its object there already, so the decision went without what it needs from it (the
        profile's uid); None otherwise."""
        original, events = body, []
        if (body.get("spec") or {}).get("placement") == "dra":
            snapshot = with_dra(self.kube, snapshot, *key_of(body))
        for _ in range(MAX_ROUNDS):
            decision = self.decision_for(body, snapshot)
            try:
                created = self.act(decision)
            except NameTaken as taken:  # decide again knowing it: that decision refuses, and applies nothing
                snapshot = replace(snapshot, names_taken=(*snapshot.names_taken, (taken.kind, taken.name)))
                decision = self.decision_for(body, snapshot)
                created = self.act(decision)
            cache_behind = len(created) < len(decision.create)
            kinds = {obj["kind"] for obj in created}
            # A create that found the object there already (made by a concurrent reconcile) is no news.
            events += [e for e in decision.events if CREATION_EVENTS.get(e.reason, "any") in kinds | {"any"}]
            if not created:
                break
            body = with_status(body, decision.status)
            snapshot = with_created(snapshot, created)
        RECONCILES.labels(decision.outcome).inc()
        if decision.scaling:
            SCALING_DECISIONS.labels(decision.scaling.direction, decision.scaling.reason).inc()
        user_pending = False
        if decision.profile_user:
            profile, reference = decision.profile_user
            user = (profile["metadata"].get("uid"), reference["uid"])
            # The cache may not show this deployment's append yet: never append it twice.
            if user not in self.users_added:
                try:
                    self.kube.add_profile_user(profile, reference)
                    self.users_added.add(user)
                except Conflict:
                    CONFLICTS.inc()
                    user_pending = True
        status = decision.status.merge_patch()
        if status != SLMDeploymentStatus.from_stored(original.get("status")).merge_patch():
            meta = original["metadata"]
            self.written[meta["namespace"], meta["name"]] = self.kube.patch_deployment_status(
                meta["namespace"], meta["name"], status, meta["resourceVersion"])
        for event in events:
            self.kube.post_event(original, event.reason, event.message, event.warning)
            log.info("%s/%s %s: %s", original["metadata"]["namespace"], original["metadata"]["name"], event.reason,
                     event.message)
        if decision.profiling_seconds:
            PROFILING_SECONDS.observe(decision.profiling_seconds)
        look_again = CONFLICT_RETRY_SECONDS if user_pending else CACHE_BEHIND_RETRY_SECONDS if cache_behind else None
        return decision, look_again

    def decision_for(self, body: dict, snapshot: ClusterSnapshot) -> Decision:
        return decide(body, snapshot, datetime.now(UTC), PROFILER_CLUSTER_ROLE, self.host_paths, ROUTER_IMAGES,
                      ROUTER_ROLE, self.engine_images, self.engine_uid)

    def act(self, decision: Decision) -> list[dict]:
        """Create and apply what the decision asks for; the objects it created, which the next
        decision should see."""
        created = [obj for obj in map(self.kube.create_if_absent, decision.create) if obj]
        for obj in decision.apply:
            self.apply(obj)
        for obj in decision.delete:
            if obj["kind"] == "StatefulSet":
                self.kube.delete_statefulset(obj)
                log.info("deleted %s %s/%s: its pack is no longer wanted", obj["kind"], obj["metadata"]["namespace"],
                         obj["metadata"]["name"])
            elif obj["kind"] == "Deployment":
                self.kube.delete_deployment(obj)
                log.info("deleted router Deployment %s/%s: spec.routing left router mode",
                         obj["metadata"]["namespace"], obj["metadata"]["name"])
            elif obj["kind"] == "NetworkPolicy":
                self.kube.delete_network_policy(obj)
                log.info("deleted NetworkPolicy %s/%s: spec.networkPolicy is unset", obj["metadata"]["namespace"],
                         obj["metadata"]["name"])
            elif self.kube.delete_unused_claim(obj):
                log.info("deleted ResourceClaim %s/%s: no pod uses it", obj["metadata"]["namespace"],
                         obj["metadata"]["name"])
        return created

    def apply(self, obj: dict) -> None:
        meta = obj["metadata"]
        child = (obj["kind"], meta.get("namespace"), meta["name"])
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
        index, version = CHILD_VERSIONS.get(obj["kind"], (None, None))
        if index and self.applied.get(child) == (digest, self.one(index, child)):
            return  # the same desired object over a child nobody changed since
        result = self.kube.apply(obj)
        if version:
            self.applied[child] = (digest, result["metadata"].get(version))


def key_of(body: dict) -> Key:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def with_dra(kube: Kube, snapshot: ClusterSnapshot, namespace: str, name: str) -> ClusterSnapshot:
    """The DRA inputs of a DRA deployment, read from the API: the apiserver this operator may meet
    ranges from one without resource.k8s.io to one serving v1, so they are not watched."""
    versions = tuple(kube.served_versions(dra.GROUP))
    served = dra.newest_served(versions)
    if not served:
        return replace(snapshot, resource_api_versions=versions)
    return replace(snapshot, resource_api_versions=versions,
                   resource_slices=tuple(kube.resource_slices(served, dra.DRIVER)),
                   resource_claims=tuple(kube.resource_claims(served, namespace, selector_labels(name))))


def metrics_targets(body: dict, snapshot: ClusterSnapshot) -> dict[str, str]:
    """Where each ready replica's engine serves /metrics: the port its pod names for scraping (a pack pod's
    supervisor, which serves all its engines'), else the deployment's."""
    port = (body.get("spec") or {}).get("port", 8000)
    return {p.name: f"http://{p.ip}:{p.metrics_port or port}/metrics" for p in snapshot.pods if p.ready and p.ip}


def with_gpus(replicas: tuple[cond.ReplicaState, ...], by_uid: dict[str, tuple[str, ...]],
              running_by_uid: dict[str, tuple[str, ...]] | None = None) -> tuple:
    """The replicas with the GPUs the exporters published for them: given, and where their processes run."""
    running_by_uid = running_by_uid or {}
    return tuple(replace(r, gpu_uuids=by_uid.get(r.uid, ()), running_gpu_uuids=running_by_uid.get(r.uid, ()))
                 for r in replicas)


def with_created(snapshot: ClusterSnapshot, created: list[dict]) -> ClusterSnapshot:
    """The snapshot plus what this reconcile just created, before the caches show it."""
    profiles = tuple(o for o in created if o["kind"] == "SLMProfile")
    jobs = tuple(profiling_job(o) for o in created if o["kind"] == "Job")
    return replace(snapshot, profiles=snapshot.profiles + profiles, jobs=snapshot.jobs + jobs)


def operator_peer(namespace: str, pod_labels: str) -> dict | None:
    """The operator's pods as a NetworkPolicy peer: its namespace by the name label every namespace carries
    from Kubernetes 1.21 (kubernetes.io/metadata.name), and its pods by their labels; None when unknown."""
    if not namespace or not pod_labels:
        return None
    labels = dict(pair.split("=", 1) for pair in pod_labels.split(","))
    return network_policy_peer({"kubernetes.io/metadata.name": namespace}, labels)


def disruption_budget_version(kube: Kube) -> str:
    """policy/v1 where the apiserver serves it (Kubernetes 1.21 on), policy/v1beta1 before."""
    served = kube.served_versions("policy")
    return DISRUPTION_BUDGET_API_VERSION if DISRUPTION_BUDGET_API_VERSION in served or not served \
        else "policy/v1beta1"


_controller: Controller | None = None


def controller() -> Controller:
    if _controller is None:
        raise RuntimeError("the operator has not started")
    return _controller


@kopf.on.startup()
async def operator_startup(settings: kopf.OperatorSettings, **kwargs) -> None:
    global _controller
    settings.posting.level = logging.WARNING  # our own Events say what was decided
    settings.watching.server_timeout = 300
    watch_selectively(settings)
    indices = {name: value for name, value in kwargs.items() if isinstance(value, kopf.Index)}
    try:
        host_paths = HostPathPolicy.from_settings(os.environ.get(MODEL_HOST_PATH_PREFIXES_ENV, ""),
                                                  os.environ.get(ENGINE_CACHE_HOST_PATH_ENV, ""))
    except ValueError as error:  # the admin's settings: no retry mends them, so the operator stops
        raise kopf.PermanentError(f"{MODEL_HOST_PATH_PREFIXES_ENV}, {ENGINE_CACHE_HOST_PATH_ENV}: {error}") from None
    try:
        engine_uid = engine_uid_setting(os.environ.get(ENGINE_UID_ENV, ""))
    except ValueError as error:
        raise kopf.PermanentError(f"{ENGINE_UID_ENV}: {error}") from None
    if engine_uid != DEFAULT_ENGINE_UID:
        # An MPS server serves one UID at a time: a client of another UID waits until it exits.
        log.warning("engines and profilers run as UID and GID %d, not %d: every MPS client of their GPUs, other "
                    "workloads and DRA claims they share included, must run as that UID, or it waits behind them",
                    engine_uid, DEFAULT_ENGINE_UID)
    kube = Kube(load_config(connections=WORKERS + 4))
    leader = None
    if LEADER_LEASE:
        namespace, _, name = LEADER_LEASE.partition("/")
        identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        leader = LeaderElection(kube, namespace, name, identity, on_lost=lambda: os._exit(1))
    else:
        log.warning("SLMPACK_LEADER_ELECTION_LEASE is unset: acting without leader election, so no other "
                    "operator may watch these namespaces")
    _controller = Controller(kube, indices, leader=leader, host_paths=host_paths,
                             operator_peer=operator_peer(os.environ.get(OPERATOR_NAMESPACE_ENV, ""),
                                                         os.environ.get(OPERATOR_POD_LABELS_ENV, "")),
                             disruption_budget_api_version=disruption_budget_version(kube), engine_uid=engine_uid,
                             engine_images=EngineImages(gpu=os.environ.get(ENGINE_IMAGE_ENV) or DEFAULT_ENGINE_IMAGE,
                                                        cpu=os.environ.get(CPU_ENGINE_IMAGE_ENV)
                                                        or DEFAULT_CPU_ENGINE_IMAGE))
    namespace = os.environ.get(GPU_ASSIGNMENTS_NAMESPACE)
    if namespace:
        _controller.gpus = GpuAssignments(kube, namespace, on_change=_controller.gpus_changed)
    else:
        log.warning("%s is not set: the replicas' GPUs are not known, and a pack split across GPUs is not seen",
                    GPU_ASSIGNMENTS_NAMESPACE)
    _controller.start()


@kopf.on.cleanup()
async def operator_cleanup(**_) -> None:
    if _controller is not None:
        await _controller.stop()


# ---------------------------------------------------------------- events only mark work


@kopf.on.event(API_GROUP, API_VERSION, "slmdeployments")
async def slmdeployment_event(namespace, name, meta, type, **_) -> None:
    if type == "DELETED":
        controller().written.pop((namespace, name), None)
    elif controller().written.get((namespace, name)) == meta.get("resourceVersion"):
        return  # the echo of this operator's own status write: nothing new to reconcile
    controller().queue.add((namespace, name))


@kopf.on.event("", "v1", "pods", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
@kopf.on.event("apps", "v1", "statefulsets", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "services", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
@kopf.on.event("apps", "v1", "deployments", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
@kopf.on.event("policy", None, "poddisruptionbudgets", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def child_event(labels, namespace, **_) -> None:
    for name in controller().all("deployments_by_label", (namespace, labels[DEPLOYMENT_LABEL])):
        controller().queue.add((namespace, name))


_profile_seen: dict[tuple, str] = {}


@kopf.on.event(API_GROUP, API_VERSION, "slmprofiles")
async def slmprofile_event(name, namespace, body, type, **_) -> None:
    # Only a new measurement matters to its users, not their own ownerReference writes.
    seen = json.dumps([type == "DELETED", body.get("status")], sort_keys=True, default=str)
    if _profile_seen.get((namespace, name)) == seen:
        return
    _profile_seen[(namespace, name)] = seen
    controller().queue_profile_users(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={PROFILE_LABEL: kopf.PRESENT})
async def profiling_job_event(labels, namespace, **_) -> None:
    controller().queue_profile_users(namespace, labels[PROFILE_LABEL])
