"""kopf handlers: parse the spec, call the pure core, act through the adapter, write status.

Reconcile is level-triggered: every run derives the desired objects from the spec and
what the cluster holds now, applies them, and rewrites the status. It runs on create,
on spec change, on operator start, and on every event of the engine pods, the profile
and its Job, so the status follows them, and a crash at any point is repaired by the
next run.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime

import kopf
from prometheus_client import Counter, Histogram

from slmpack import API_GROUP, API_VERSION
from slmpack.adapters.kube import Kube, load_config
from slmpack.api.models import Device, Placement, SLMDeploymentSpec, SLMDeploymentStatus, SLMProfileStatus
from slmpack.core import conditions as cond
from slmpack.core.manifests import (
    DEPLOYMENT_LABEL,
    PROFILE_LABEL,
    Owner,
    build_profile,
    build_profiler_access,
    build_profiling_job,
    build_resource_claim,
    build_service,
    build_statefulset,
    profile_conditions,
    profiling_job_name,
    selector_labels,
    service_endpoint,
)
from slmpack.core.planner import plan
from slmpack.core.validation import GPUNode, InvalidSpec, NoMatchingNode, choose_node, parse_spec, spec_problems

NODE_RETRY_SECONDS = 30
PROFILER_CLUSTER_ROLE = os.environ.get("SLMPACK_PROFILER_CLUSTER_ROLE", "slmpack-profiler")

RECONCILES = Counter("slmpack_operator_reconciles_total", "SLMDeployment reconciles, by outcome.", ["outcome"])
ERRORS = Counter("slmpack_operator_errors_total", "Reconciles that raised an unexpected error.")
PROFILING_SECONDS = Histogram("slmpack_operator_profiling_duration_seconds",
                              "Time from a profile's creation to its measurement, seen when it becomes ready.",
                              buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200))

log = logging.getLogger(__name__)
_kube: Kube | None = None


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube(load_config())
    return _kube


@kopf.on.startup()
def operator_startup(settings: kopf.OperatorSettings, **_) -> None:
    # Keep kopf's bookkeeping out of status, which belongs to the API.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # our own Events say what was decided
    settings.watching.server_timeout = 300


class Reconciler:
    """One reconcile of one SLMDeployment; collects conditions and status as it goes."""

    def __init__(self, body: kopf.Body, kube: Kube, now: datetime) -> None:
        self.body, self.kube, self.now = body, kube, now
        self.meta = body["metadata"]
        self.namespace, self.name = self.meta["namespace"], self.meta["name"]
        self.generation = self.meta.get("generation")
        self.before = SLMDeploymentStatus.from_stored(body.get("status"))
        self.status = self.before.model_copy(deep=True)
        self.status.observed_generation = self.generation
        self.waiting_for_node = False

    # ---- conditions and events

    def condition(self, type_: str, ok: bool, reason: str, message: str, warn: bool = False) -> None:
        previous = cond.get_condition(self.before.conditions, type_)
        self.status.conditions = cond.set_condition(self.status.conditions, type_, ok, reason, message, self.now,
                                                    self.generation)
        if previous is None or previous.reason != reason or previous.message != message:
            (kopf.warn if warn else kopf.info)(self.body, reason=reason, message=message)
            log.info("%s/%s %s=%s %s: %s", self.namespace, self.name, type_, ok, reason, message)

    def finish(self) -> dict:
        self.status.phase = cond.derive_phase(self.status.conditions)
        return self.status.to_wire()

    # ---- the steps

    def run(self) -> dict:
        try:
            spec = parse_spec(self.body["spec"])
            problems = spec_problems(spec)
            if problems:
                raise InvalidSpec("; ".join(problems))
            node = choose_node(spec, self.kube.gpu_nodes())
        except InvalidSpec as error:
            self.condition(cond.INVALID_SPEC, True, "InvalidSpec", str(error), warn=True)
            RECONCILES.labels("invalid").inc()
            self.waiting_for_node = isinstance(error, NoMatchingNode)
            return self.finish()
        self.condition(cond.INVALID_SPEC, False, "SpecValid", "the spec is valid and a GPU node matches")

        profile = None
        if spec.replicas == "auto":
            profile = self.resolve_profile(spec, node)
            if profile is None:
                RECONCILES.labels("profiling").inc()
                return self.finish()
        else:
            self.status.profile = None
            self.status.profiling_phase = None
            self.condition(cond.PROFILE_READY, True, "ProfilingSkipped",
                           f"spec.replicas fixes {spec.replicas} replicas; no profile is needed")
        self.place(spec, node, profile)
        RECONCILES.labels("placed").inc()
        return self.finish()

    def resolve_profile(self, spec: SLMDeploymentSpec, node: GPUNode) -> SLMProfileStatus | None:
        """The profile to plan from, or None while it is being measured (status says why)."""
        ref = spec.profiling.profile_ref
        if ref:
            profile = self.kube.get_profile(self.namespace, ref)
            if profile is None:
                self.condition(cond.PROFILE_READY, False, "ProfileNotFound",
                               f"spec.profiling.profileRef names SLMProfile {ref}, which does not exist in "
                               f"{self.namespace}: create it or remove profileRef", warn=True)
                return None
        else:
            conditions = profile_conditions(spec, node.gpu_memory_mib)
            existing = self.kube.profiles_with_key(self.namespace, conditions.key())
            ready = [p for p in existing if (p.get("status") or {}).get("phase") == "Ready"]
            profile = (ready or existing or [None])[0]
            if profile is None:
                profile = build_profile(self.namespace, conditions, spec)
                if self.kube.create_if_absent(profile):
                    kopf.info(self.body, reason="ProfileCreated",
                              message=f"no profile matches model x GPU x engine x workload: profiling into "
                                      f"SLMProfile {profile['metadata']['name']}")
                profile = self.kube.get_profile(self.namespace, profile["metadata"]["name"]) or profile
        name = profile["metadata"]["name"]
        self.status.profile = name
        if profile["metadata"].get("labels", {}).get("app.kubernetes.io/managed-by") == "slmpack":
            # Profiles the operator made are shared by their users and collected after the last one.
            user = Owner(kind="SLMDeployment", name=self.name, uid=self.meta["uid"], namespace=self.namespace)
            self.kube.add_profile_user(profile, {**user.reference(), "controller": False})
        measured = SLMProfileStatus.from_stored(profile.get("status"))
        if measured.phase == "Ready" and measured.knee is not None:
            newly_ready = not cond.is_true(self.before.conditions, cond.PROFILE_READY)
            if newly_ready and measured.sweep and measured.sweep.duration_s:
                PROFILING_SECONDS.observe(measured.sweep.duration_s)
            self.status.profiling_phase = None
            self.condition(cond.PROFILE_READY, True, "ProfileMeasured",
                           f"SLMProfile {name}: knee at batch {measured.knee.batch_size}, "
                           f"{measured.recommended_replicas or 1} replica(s) recommended")
            return measured
        if ref:
            self.condition(cond.PROFILE_READY, False, "ProfileNotReady",
                           f"SLMProfile {name} (spec.profiling.profileRef) has no measured knee yet")
            return None
        return self.profile_in_progress(spec, node, profile, measured)

    def profile_in_progress(self, spec, node: GPUNode, profile: dict, measured: SLMProfileStatus) -> None:
        name, uid = profile["metadata"]["name"], profile["metadata"].get("uid")
        job_name = profiling_job_name(name)
        job = self.kube.get_job(self.namespace, job_name)
        if job is None and measured.phase != "Failed" and uid:
            for access in build_profiler_access(self.namespace, PROFILER_CLUSTER_ROLE):
                self.kube.apply(access)
            owner = Owner(kind="SLMProfile", name=name, uid=uid, namespace=self.namespace)
            conditions = profile_conditions(spec, node.gpu_memory_mib)
            slots = node.sharing_slots if spec.placement == Placement.device_plugin else 1
            if self.kube.create_if_absent(build_profiling_job(owner, conditions, spec, node.name, slots)):
                kopf.info(self.body, reason="ProfilingStarted",
                          message=f"profiling Job {job_name} started on node {node.name}")
        failed = job is not None and any(c.type == "Failed" and c.status == "True"
                                         for c in (job.status.conditions or []))
        if failed or measured.phase == "Failed":
            why = measured.message or next((c.message for c in job.status.conditions if c.type == "Failed"), "")
            self.status.profiling_phase = None
            self.condition(cond.PROFILE_READY, False, "ProfilingFailed",
                           f"profiling Job {job_name} failed after its retries: {why}. Delete SLMProfile {name} "
                           "to profile again", warn=True)
            return
        self.status.profiling_phase = measured.profiling_phase
        progress = measured.message or "waiting for the profiling Job to start"
        self.condition(cond.PROFILE_READY, False, "Profiling", f"SLMProfile {name}: {progress}")
        return

    def place(self, spec: SLMDeploymentSpec, node: GPUNode, profile: SLMProfileStatus | None) -> None:
        decided = plan(spec, profile, node.gpu_memory_mib, node.sharing_slots)
        owner = Owner(kind="SLMDeployment", name=self.name, uid=self.meta["uid"], namespace=self.namespace)
        objects = [build_service(owner, spec), build_statefulset(owner, spec, decided, node.name)]
        if spec.placement == Placement.dra:
            objects.insert(0, build_resource_claim(owner, spec, decided))
        for obj in objects:
            self.kube.apply(obj)
        self.status.plan, self.status.replicas = decided, decided.replicas
        self.status.endpoint = service_endpoint(owner, spec)
        where = "on the CPU" if spec.engine.device == Device.cpu else f"sharing one GPU by {spec.sharing.value}"
        self.condition(cond.PLACED, True, "StatefulSetApplied",
                       f"{decided.replicas} replica(s) on node {node.name} {where}: {decided.explanation}")
        self.follow_replicas(decided.replicas)

    def follow_replicas(self, planned: int) -> None:
        pods = self.kube.pods(self.namespace, selector_labels(self.name))
        states = [replica_state(p) for p in pods]
        ready = sum(s.ready for s in states)
        self.status.ready_replicas = ready
        problem = cond.replica_problem(states)
        if problem:
            self.condition(cond.AVAILABLE, False, "ReplicaFailing", problem, warn=True)
        elif ready >= planned:
            self.condition(cond.AVAILABLE, True, "ReplicasReady", f"{ready}/{planned} replicas ready")
        else:
            self.condition(cond.AVAILABLE, False, "ReplicasStarting",
                           f"{ready}/{planned} replicas ready; they start one by one")


def replica_state(pod) -> cond.ReplicaState:
    statuses = pod.status.container_statuses or []
    engine = next((s for s in statuses if s.name == "engine"), statuses[0] if statuses else None)
    if engine is None:
        return cond.ReplicaState(name=pod.metadata.name, ready=False)
    waiting = engine.state.waiting.reason if engine.state and engine.state.waiting else None
    terminated = engine.last_state.terminated if engine.last_state else None
    return cond.ReplicaState(name=pod.metadata.name, ready=bool(engine.ready), waiting_reason=waiting,
                             last_termination_reason=terminated.reason if terminated else None,
                             restarts=engine.restart_count or 0)


def reconcile(body: kopf.Body, patch: kopf.Patch) -> None:
    started = time.monotonic()
    reconciler = Reconciler(body, kube(), datetime.now(UTC))
    try:
        status = reconciler.run()
    except Exception:
        ERRORS.inc()
        raise
    # Every known field is written, absent ones as None, so a merge patch also clears them.
    for field in SLMDeploymentStatus.model_fields.values():
        patch.status[field.alias] = status.get(field.alias)
    log.debug("reconciled %s in %.3fs", body["metadata"]["name"], time.monotonic() - started)
    if reconciler.waiting_for_node:
        # The status says why; try again later, when a matching node may have joined.
        raise kopf.TemporaryError("no matching GPU node yet", delay=NODE_RETRY_SECONDS)


@kopf.on.create(API_GROUP, API_VERSION, "slmdeployments")
@kopf.on.update(API_GROUP, API_VERSION, "slmdeployments", field="spec")
@kopf.on.resume(API_GROUP, API_VERSION, "slmdeployments")
def slmdeployment_changed(body, patch, **_) -> None:
    reconcile(body, patch)


# The status follows what the deployment depends on. These are event handlers, not timers:
# kopf guards timers with a finalizer, and a finalizer would block deletion whenever the
# operator is not running. Each event re-runs the same level-triggered reconcile.


def refresh(namespace: str, name: str) -> None:
    body = kube().get_deployment(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    status = Reconciler(body, kube(), datetime.now(UTC)).run()
    kube().patch_deployment_status(namespace, name, {
        field.alias: status.get(field.alias) for field in SLMDeploymentStatus.model_fields.values()},
        body["metadata"]["resourceVersion"])


@kopf.on.event("", "v1", "pods", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
def engine_pod_event(labels, namespace, **_) -> None:
    refresh(namespace, labels[DEPLOYMENT_LABEL])


@kopf.on.event(API_GROUP, API_VERSION, "slmprofiles")
def slmprofile_event(name, namespace, **_) -> None:
    for deployment in kube().deployments_using_profile(namespace, name):
        refresh(namespace, deployment)


@kopf.on.event("batch", "v1", "jobs", labels={PROFILE_LABEL: kopf.PRESENT})
def profiling_job_event(labels, namespace, **_) -> None:
    for deployment in kube().deployments_using_profile(namespace, labels[PROFILE_LABEL]):
        refresh(namespace, deployment)
