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

from slmpack import API_GROUP, API_VERSION, GPU_UUIDS_ANNOTATION
from slmpack.adapters.kube import Kube, load_config
from slmpack.api.models import SLMDeploymentStatus
from slmpack.core import conditions as cond
from slmpack.core import dra
from slmpack.core.decide import ClusterSnapshot, Decision, ProfilingJob, decide, with_status
from slmpack.core.manifests import DEPLOYMENT_LABEL, PROFILE_LABEL, selector_labels

PROFILER_CLUSTER_ROLE = os.environ.get("SLMPACK_PROFILER_CLUSTER_ROLE", "slmpack-profiler")
# A decision that creates the profile needs its uid for the Job: decide again after creating, a few times at most.
MAX_ROUNDS = 3

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


def read_snapshot(kube: Kube, namespace: str, name: str, placement: str | None = None) -> ClusterSnapshot:
    """What the decision depends on, read from the API now; the DRA inputs only for a DRA deployment."""
    versions, slices, claims = (), (), ()
    if placement == "dra":
        versions = tuple(kube.served_versions(dra.GROUP))
        served = dra.newest_served(versions)
        if served:
            slices = tuple(kube.resource_slices(served, dra.DRIVER))
            claims = tuple(kube.resource_claims(served, namespace, selector_labels(name)))
    return ClusterSnapshot(
        nodes=tuple(kube.gpu_nodes()),
        profiles=tuple(kube.profiles(namespace)),
        jobs=tuple(profiling_job(j) for j in kube.jobs(namespace, PROFILE_LABEL)),
        pods=tuple(replica_state(p) for p in kube.pods(namespace, selector_labels(name))),
        resource_api_versions=versions, resource_slices=slices, resource_claims=claims,
    )


def profiling_job(job) -> ProfilingJob:
    failed = next((c for c in (job.status.conditions or []) if c.type == "Failed" and c.status == "True"), None)
    return ProfilingJob(name=job.metadata.name, failed=failed is not None,
                        failure_message=(failed.message or "") if failed else "")


def replica_state(pod) -> cond.ReplicaState:
    statuses = pod.status.container_statuses or []
    engine = next((s for s in statuses if s.name == "engine"), statuses[0] if statuses else None)
    uuids = (pod.metadata.annotations or {}).get(GPU_UUIDS_ANNOTATION, "")
    where = {"node": pod.spec.node_name if pod.spec else None,
             "gpu_uuids": tuple(u.strip() for u in uuids.split(",") if u.strip()),
             "claims": tuple(c.resource_claim_name for c in (pod.spec.resource_claims if pod.spec else None) or []
                             if c.resource_claim_name)}
    if engine is None:
        return cond.ReplicaState(name=pod.metadata.name, ready=False, **where)
    waiting = engine.state.waiting.reason if engine.state and engine.state.waiting else None
    terminated = engine.last_state.terminated if engine.last_state else None
    return cond.ReplicaState(name=pod.metadata.name, ready=bool(engine.ready), waiting_reason=waiting,
                             last_termination_reason=terminated.reason if terminated else None,
                             restarts=engine.restart_count or 0, **where)


def act(kube: Kube, body: dict, decision: Decision) -> bool:
    """Carry out a decision; True when it created something the next decision should see."""
    created = False
    for obj in decision.create:
        created |= kube.create_if_absent(obj)
    for obj in decision.apply:
        kube.apply(obj)
    if decision.profile_user:
        kube.add_profile_user(*decision.profile_user)
    for claim in decision.delete:
        if kube.delete_unused_claim(claim):
            log.info("deleted ResourceClaim %s/%s: no pod uses it", claim["metadata"]["namespace"],
                     claim["metadata"]["name"])
    for event in decision.events:
        (kopf.warn if event.warning else kopf.info)(body, reason=event.reason, message=event.message)
        log.info("%s/%s %s: %s", body["metadata"]["namespace"], body["metadata"]["name"], event.reason,
                 event.message)
    if decision.profiling_seconds:
        PROFILING_SECONDS.observe(decision.profiling_seconds)
    return created


def reconcile_once(body: dict, kube: Kube) -> Decision:
    """Read, decide, act; again while acting created objects the decision depends on (the profile's uid)."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for _ in range(MAX_ROUNDS):
        placement = (body.get("spec") or {}).get("placement")
        decision = decide(body, read_snapshot(kube, namespace, name, placement), datetime.now(UTC),
                          PROFILER_CLUSTER_ROLE)
        if not act(kube, body, decision):
            break
        body = with_status(body, decision.status)
    RECONCILES.labels(decision.outcome).inc()
    return decision


def status_patch(status: SLMDeploymentStatus) -> dict:
    # Every known field is written, absent ones as None, so a merge patch also clears them.
    wire = status.to_wire()
    return {field.alias: wire.get(field.alias) for field in SLMDeploymentStatus.model_fields.values()}


def reconcile(body: kopf.Body, patch: kopf.Patch) -> None:
    started = time.monotonic()
    try:
        decision = reconcile_once(dict(body), kube())
    except Exception:
        ERRORS.inc()
        raise
    for key, value in status_patch(decision.status).items():
        patch.status[key] = value
    log.debug("reconciled %s in %.3fs", body["metadata"]["name"], time.monotonic() - started)
    if decision.retry_after_seconds:
        # The status says why; try again later, when a matching node may have joined.
        raise kopf.TemporaryError("waiting for the cluster (see the conditions)", delay=decision.retry_after_seconds)


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
    decision = reconcile_once(body, kube())
    kube().patch_deployment_status(namespace, name, status_patch(decision.status))


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
