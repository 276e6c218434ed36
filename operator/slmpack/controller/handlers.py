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

from slmpack import API_GROUP, API_VERSION, GPU_UUIDS_ANNOTATION
from slmpack.adapters.engine_metrics import EngineMetrics
from slmpack.adapters.kube import Conflict, Kube, load_config
from slmpack.api.models import SLMDeploymentStatus
from slmpack.controller.leader import LeaderElection
from slmpack.controller.workqueue import Retry, WorkQueue, work
from slmpack.core import conditions as cond
from slmpack.core import dra
from slmpack.core.decide import ClusterSnapshot, Decision, ProfilingJob, decide, with_status
from slmpack.core.manifests import DEPLOYMENT_LABEL, PROFILE_LABEL, label_value, selector_labels
from slmpack.core.validation import GPUNode

PROFILER_CLUSTER_ROLE = os.environ.get("SLMPACK_PROFILER_CLUSTER_ROLE", "slmpack-profiler")
# "NAMESPACE/NAME" of the Lease that elects the acting replica; unset runs without election.
LEADER_LEASE = os.environ.get("SLMPACK_LEADER_ELECTION_LEASE", "")
# Reconciles at once (of different deployments). They mostly wait on the apiserver, so they run
# in threads of their own, not in the event loop's small default pool.
WORKERS = int(os.environ.get("SLMPACK_WORKERS", "16"))
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
    profile = status.get("profile")
    return {(namespace, profile): name} if profile else None


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
CHILD_VERSIONS = {"StatefulSet": ("statefulset_index", "generation"), "Service": ("service_index", "resourceVersion")}


@kopf.index("apps", "v1", "statefulsets", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def statefulset_index(namespace, name, meta, **_):
    return {("StatefulSet", namespace, name): meta.get("generation")}


@kopf.index("", "v1", "services", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def service_index(namespace, name, meta, **_):
    return {("Service", namespace, name): meta.get("resourceVersion")}


@kopf.index("apps", "v1", "statefulsets", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def packs_by_deployment(namespace, name, uid, labels, **_):
    """The packs' StatefulSets of each deployment: one no longer wanted is deleted."""
    return {(namespace, labels[DEPLOYMENT_LABEL]): {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                    "metadata": {"name": name, "namespace": namespace, "uid": uid}}}


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
    uuids = (meta.get("annotations") or {}).get(GPU_UUIDS_ANNOTATION, "")
    spec = pod.get("spec") or {}
    where = {"node": spec.get("nodeName"), "ip": status.get("podIP"),
             "gpu_uuids": tuple(u.strip() for u in uuids.split(",") if u.strip()),
             "claims": tuple(c["resourceClaimName"] for c in spec.get("resourceClaims") or []
                             if c.get("resourceClaimName"))}
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
                   allocatable={k: int(parse_quantity(v)) for k, v in allocatable.items()})


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
    engines: EngineMetrics = field(default_factory=EngineMetrics)

    def start(self) -> None:
        may_work = self.leader.wait_to_lead if self.leader else None
        self.tasks = [asyncio.create_task(work(self.queue, self.reconcile, may_work)) for _ in range(WORKERS)]
        if self.leader:
            self.tasks.append(asyncio.create_task(self.leader.run()))

    async def stop(self) -> None:
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

    def snapshot(self, namespace: str, name: str) -> ClusterSnapshot:
        return ClusterSnapshot(
            nodes=self.all("node_index", None),
            profiles=self.all("profile_index", namespace),
            jobs=tuple(profiling_job(j, self.all("profiler_pod_index", (namespace, j["metadata"]["name"])))
                       for j in self.all("job_index", namespace)),
            pods=self.all("pod_index", (namespace, label_value(name))),
            statefulsets=self.all("packs_by_deployment", (namespace, label_value(name))),
        )

    # ---- one reconcile

    async def reconcile(self, key: Key) -> float | None:
        body = self.one("deployment_index", key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # gone: its children go by garbage collection
        started = time.monotonic()
        snapshot = self.snapshot(*key)
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
        if (body.get("spec") or {}).get("autoscaling"):
            snapshot = replace(snapshot, engine_loads=self.engines.loads(metrics_targets(body, snapshot)))
        for _ in range(MAX_ROUNDS):
            decision = decide(body, snapshot, datetime.now(UTC), PROFILER_CLUSTER_ROLE)
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
        status = status_patch(decision.status)
        if status != status_patch(SLMDeploymentStatus.from_stored(original.get("status"))):
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
    """Where each ready replica's engine serves /metrics."""
    port = (body.get("spec") or {}).get("port", 8000)
    return {p.name: f"http://{p.ip}:{port}/metrics" for p in snapshot.pods if p.ready and p.ip}


def with_created(snapshot: ClusterSnapshot, created: list[dict]) -> ClusterSnapshot:
    """The snapshot plus what this reconcile just created, before the caches show it."""
    profiles = tuple(o for o in created if o["kind"] == "SLMProfile")
    jobs = tuple(profiling_job(o) for o in created if o["kind"] == "Job")
    return replace(snapshot, profiles=snapshot.profiles + profiles, jobs=snapshot.jobs + jobs)


def status_patch(status: SLMDeploymentStatus) -> dict:
    # Every known field is written, absent ones as None, so a merge patch also clears them.
    wire = status.to_wire()
    return {field.alias: wire.get(field.alias) for field in SLMDeploymentStatus.model_fields.values()}


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
    indices = {name: value for name, value in kwargs.items() if isinstance(value, kopf.Index)}
    kube = Kube(load_config(connections=WORKERS + 4))
    leader = None
    if LEADER_LEASE:
        namespace, _, name = LEADER_LEASE.partition("/")
        identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        leader = LeaderElection(kube, namespace, name, identity, on_lost=lambda: os._exit(1))
    _controller = Controller(kube, indices, leader=leader)
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
    for deployment in controller().all("deployments_by_profile", (namespace, name)):
        controller().queue.add((namespace, deployment))


@kopf.on.event("batch", "v1", "jobs", labels={PROFILE_LABEL: kopf.PRESENT})
async def profiling_job_event(labels, namespace, **_) -> None:
    for deployment in controller().all("deployments_by_profile", (namespace, labels[PROFILE_LABEL])):
        controller().queue.add((namespace, deployment))
