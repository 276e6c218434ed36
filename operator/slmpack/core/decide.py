"""The operator's whole decision for one SLMDeployment, as a pure function (no I/O).

`decide(deployment, cluster, now)` takes the SLMDeployment as the API stores it (metadata,
spec, status), a snapshot of what the cluster holds, and the time; it returns the objects to
apply, the objects to create if absent, the status to write and the Events to post. The
operator's handlers read the snapshot, call it, and act; `slmpack render` calls it on Node
and SLMProfile files and prints the result. Both go through this one function, as
`helm template` and `helm install` share one engine.

Reconcile is level-triggered: a decision depends only on its inputs, so running it twice on
the same snapshot asks for the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from slmpack.api.models import (
    Device,
    Placement,
    ReplicaGPU,
    SLMDeploymentSpec,
    SLMDeploymentStatus,
    SLMProfileStatus,
)
from slmpack.core import conditions as cond
from slmpack.core.manifests import (
    MANAGED_BY,
    PROFILE_KEY_LABEL,
    Owner,
    build_profile,
    build_profiler_access,
    build_profiling_job,
    build_resource_claim,
    build_service,
    build_statefulset,
    profile_conditions,
    profiling_job_name,
    service_endpoint,
)
from slmpack.core.planner import plan
from slmpack.core.validation import GPUNode, InvalidSpec, NoMatchingNode, choose_node, parse_spec, spec_problems

# How long to wait before looking for a matching GPU node again.
NODE_RETRY_SECONDS = 30
# The profiler writes its result before it exits, but the profile's watch may lag the Job's.
RESULT_GRACE_SECONDS = 30
DEFAULT_PROFILER_CLUSTER_ROLE = "slmpack-profiler"


@dataclass(frozen=True)
class ProfilingJob:
    """What the operator reads of a profiling Job."""

    name: str
    failed: bool = False
    failure_message: str = ""  # the message of its Failed condition, and why its last pod ended
    completed_at: datetime | None = None  # when it succeeded, if it did


@dataclass(frozen=True)
class ClusterSnapshot:
    """What the cluster holds that the decision depends on, read at one moment."""

    nodes: tuple[GPUNode, ...] = ()
    # The SLMProfiles of the deployment's namespace, as the API returns them (metadata, spec, status).
    profiles: tuple[dict, ...] = ()
    # The profiling Jobs of the deployment's namespace.
    jobs: tuple[ProfilingJob, ...] = ()
    # The deployment's engine pods, with the GPUs the node reports for each.
    pods: tuple[cond.ReplicaState, ...] = ()
    # DRA inputs: the resource.k8s.io versions the apiserver serves, and its ResourceSlices.
    resource_api_versions: tuple[str, ...] = ()
    resource_slices: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Event:
    """An Event to post on the SLMDeployment."""

    reason: str
    message: str
    warning: bool = False


@dataclass
class Decision:
    """What to do, and what to report."""

    status: SLMDeploymentStatus
    # Server-side applied every time: the desired state of these objects.
    apply: list[dict] = field(default_factory=list)
    # Created only when absent (their name makes "exactly one" hold): profile, profiling Job, its access.
    create: list[dict] = field(default_factory=list)
    # A profile shared by several deployments lists each as an owner: (profile, ownerReference) to add.
    profile_user: tuple[dict, dict] | None = None
    events: list[Event] = field(default_factory=list)
    # invalid | profiling | placed
    outcome: str = "placed"
    # Try again after this many seconds even when nothing changes (a node may join).
    retry_after_seconds: int | None = None
    # Set once, when the profile turns Ready: how long it took to measure.
    profiling_seconds: float | None = None


class _Decider:
    """One decision; collects conditions and Events as it goes."""

    def __init__(self, deployment: dict, cluster: ClusterSnapshot, now: datetime, profiler_cluster_role: str):
        self.cluster, self.now, self.profiler_cluster_role = cluster, now, profiler_cluster_role
        self.meta = deployment["metadata"]
        self.namespace, self.name = self.meta["namespace"], self.meta["name"]
        self.generation = self.meta.get("generation")
        self.before = SLMDeploymentStatus.from_stored(deployment.get("status"))
        status = self.before.model_copy(deep=True)
        status.observed_generation = self.generation
        self.decision = Decision(status=status)
        self.warnings: dict[str, bool] = {}
        self.raw_spec = deployment.get("spec") or {}

    @property
    def status(self) -> SLMDeploymentStatus:
        return self.decision.status

    def owner(self) -> Owner:
        return Owner(kind="SLMDeployment", name=self.name, uid=self.meta.get("uid", ""), namespace=self.namespace)

    def condition(self, type_: str, ok: bool | str, reason: str, message: str, warn: bool = False) -> None:
        """Set a condition; an Event follows when its reason or message ends up changed."""
        self.status.conditions = cond.set_condition(self.status.conditions, type_, ok, reason, message, self.now,
                                                    self.generation)
        self.warnings[type_] = warn

    def finish(self, outcome: str) -> Decision:
        for condition in self.status.conditions:
            previous = cond.get_condition(self.before.conditions, condition.type)
            if previous is None or (previous.reason, previous.message) != (condition.reason, condition.message):
                self.decision.events.append(Event(condition.reason, condition.message,
                                                  self.warnings.get(condition.type, False)))
        self.status.phase = cond.derive_phase(self.status.conditions)
        self.decision.outcome = outcome
        return self.decision

    # ---- the steps

    def run(self) -> Decision:
        try:
            spec = parse_spec(self.raw_spec)
            problems = spec_problems(spec)
            if problems:
                raise InvalidSpec("; ".join(problems))
            node = choose_node(spec, list(self.cluster.nodes))
        except InvalidSpec as error:
            self.condition(cond.INVALID_SPEC, True, "InvalidSpec", str(error), warn=True)
            if isinstance(error, NoMatchingNode):
                # The status says why; a matching node may join or be labelled later.
                self.decision.retry_after_seconds = NODE_RETRY_SECONDS
            return self.finish("invalid")
        self.condition(cond.INVALID_SPEC, False, "SpecValid", "the spec is valid and a GPU node matches")

        profile = None
        if spec.replicas == "auto":
            profile = self.resolve_profile(spec, node)
            if profile is None:
                return self.finish("profiling")
        else:
            self.status.profile = None
            self.status.profiling_phase = None
            self.condition(cond.PROFILE_READY, True, "ProfilingSkipped",
                           f"spec.replicas fixes {spec.replicas} replicas; no profile is needed")
        try:
            self.place(spec, node, profile)
        except InvalidSpec as error:  # the measured model does not fit this node's share of a GPU
            self.condition(cond.INVALID_SPEC, True, "InvalidSpec", str(error), warn=True)
            return self.finish("invalid")
        return self.finish("placed")

    def find_profile(self, name: str) -> dict | None:
        return next((p for p in self.cluster.profiles if p["metadata"]["name"] == name), None)

    def resolve_profile(self, spec: SLMDeploymentSpec, node: GPUNode) -> SLMProfileStatus | None:
        """The profile to plan from, or None while it is being measured (status says why)."""
        ref = spec.profiling.profile_ref
        if ref:
            profile = self.find_profile(ref)
            if profile is None:
                self.condition(cond.PROFILE_READY, False, "ProfileNotFound",
                               f"spec.profiling.profileRef names SLMProfile {ref}, which does not exist in "
                               f"{self.namespace}: create it or remove profileRef", warn=True)
                return None
        else:
            key = profile_conditions(spec, node.gpu_memory_mib).key()
            existing = sorted((p for p in self.cluster.profiles
                               if p["metadata"].get("labels", {}).get(PROFILE_KEY_LABEL) == key),
                              key=lambda p: p["metadata"]["name"])
            ready = [p for p in existing if (p.get("status") or {}).get("phase") == "Ready"]
            profile = (ready or existing or [None])[0]
            if profile is None:
                profile = build_profile(self.namespace, profile_conditions(spec, node.gpu_memory_mib), spec)
                self.decision.create.append(profile)
                self.decision.events.append(Event(
                    "ProfileCreated", f"no profile matches model x GPU x engine x workload: profiling into "
                                      f"SLMProfile {profile['metadata']['name']}"))
        name = profile["metadata"]["name"]
        self.status.profile = name
        labels = profile["metadata"].get("labels", {})
        if MANAGED_BY.items() <= labels.items() and profile["metadata"].get("uid"):
            # Profiles the operator made are shared by their users and collected after the last one.
            self.decision.profile_user = (profile, {**self.owner().reference(), "controller": False})
        measured = SLMProfileStatus.from_stored(profile.get("status"))
        if measured.phase == "Ready" and measured.knee is not None:
            newly_ready = not cond.is_true(self.before.conditions, cond.PROFILE_READY)
            if newly_ready and measured.sweep and measured.sweep.duration_s:
                self.decision.profiling_seconds = measured.sweep.duration_s
            self.status.profiling_phase = None
            self.condition(cond.PROFILE_READY, True, "ProfileMeasured",
                           f"SLMProfile {name}: knee at batch {measured.knee.batch_size}, "
                           f"{measured.recommended_replicas or 1} replica(s) recommended")
            return measured
        if ref:
            self.condition(cond.PROFILE_READY, False, "ProfileNotReady",
                           f"SLMProfile {name} (spec.profiling.profileRef) has no measured knee yet")
            return None
        self.profile_in_progress(spec, node, profile, measured)
        return None

    def profile_in_progress(self, spec: SLMDeploymentSpec, node: GPUNode, profile: dict,
                            measured: SLMProfileStatus) -> None:
        name, uid = profile["metadata"]["name"], profile["metadata"].get("uid")
        job_name = profiling_job_name(name)
        job = next((j for j in self.cluster.jobs if j.name == job_name), None)
        if job is None and measured.phase != "Failed" and uid:
            # The Job is owned by the profile, so it waits for the profile's uid (the next decision).
            self.decision.create += build_profiler_access(self.namespace, self.profiler_cluster_role)
            owner = Owner(kind="SLMProfile", name=name, uid=uid, namespace=self.namespace)
            self.decision.create.append(build_profiling_job(owner, profile_conditions(spec, node.gpu_memory_mib),
                                                            spec, node))
            self.decision.events.append(Event("ProfilingStarted",
                                              f"profiling Job {job_name} started on node {node.name}"))
        if job is not None and job.completed_at is not None and measured.phase != "Failed":
            waited = (self.now - job.completed_at).total_seconds()
            if waited < RESULT_GRACE_SECONDS:
                self.decision.retry_after_seconds = int(RESULT_GRACE_SECONDS - waited) + 1
            else:
                self.status.profiling_phase = None
                self.condition(cond.PROFILE_READY, False, "ProfilingFailed",
                               f"profiling Job {job_name} completed, but SLMProfile {name} holds no measured knee: "
                               f"the profiler's result never arrived. See the Job's logs, and delete SLMProfile "
                               f"{name} to profile again", warn=True)
                return
        if (job is not None and job.failed) or measured.phase == "Failed":
            why = measured.message or (job.failure_message if job else "")
            self.status.profiling_phase = None
            self.condition(cond.PROFILE_READY, False, "ProfilingFailed",
                           f"profiling Job {job_name} failed after its retries: {why}. Delete SLMProfile {name} "
                           "to profile again", warn=True)
            return
        self.status.profiling_phase = measured.profiling_phase
        progress = measured.message or "waiting for the profiling Job to start"
        self.condition(cond.PROFILE_READY, False, "Profiling", f"SLMProfile {name}: {progress}")

    def place(self, spec: SLMDeploymentSpec, node: GPUNode, profile: SLMProfileStatus | None) -> None:
        plugin_mps = spec.placement == Placement.device_plugin and node.sharing_strategy == "mps"
        decided = plan(spec, profile, node.gpu_memory_mib, node.sharing_slots, plugin_mps)
        owner = self.owner()
        objects = [build_service(owner, spec), build_statefulset(owner, spec, decided, node)]
        if spec.placement == Placement.dra:
            objects.insert(0, build_resource_claim(owner, spec, decided))
        self.decision.apply += objects
        self.status.plan, self.status.replicas = decided, decided.replicas
        self.status.endpoint = service_endpoint(owner, spec)
        if spec.engine.device == Device.cpu:
            where = "on the CPU"
        elif spec.placement == Placement.device_plugin and node.sharing_strategy == "none":
            where = "on a whole GPU (the node does not share its GPUs)"
        else:
            where = f"sharing one GPU by {spec.sharing.value}"
        self.condition(cond.PLACED, True, "StatefulSetApplied",
                       f"{decided.replicas} replica(s) on node {node.name} {where}: {decided.explanation}")
        self.follow_replicas(decided.replicas)
        if spec.engine.device == Device.gpu:
            self.check_one_gpu(spec, node, decided.replicas)

    def check_one_gpu(self, spec: SLMDeploymentSpec, node: GPUNode, planned: int) -> None:
        """Whether the pack shares one physical GPU: verified from the UUIDs the node reports per replica,
        guaranteed by the mechanism where it can be (one DRA claim, or a node with one GPU)."""
        pods = sorted(self.cluster.pods, key=lambda p: p.name)
        by_gpu: dict[str, list[str]] = {}
        for pod in pods:
            for uuid in pod.gpu_uuids:
                by_gpu.setdefault(uuid, []).append(pod.name)
        if len(by_gpu) > 1:
            where = "; ".join(f"{', '.join(names)} on {uuid}" for uuid, names in sorted(by_gpu.items()))
            self.condition(cond.ONE_GPU, False, "SplitAcrossGPUs",
                           f"the pack is split over {len(by_gpu)} GPUs of node {node.name} ({where}), so its "
                           "replicas do not share one GPU. The device plugin spreads shared slots over a node's "
                           "GPUs: use placement dra (one ResourceClaim, one GPU), or nodes with one GPU "
                           "(nvidia.com/gpu.count=1); the plugin's packed allocation policy is best effort",
                           warn=True)
            return
        reported = [p for p in pods if p.gpu_uuids]
        if by_gpu and len(reported) >= planned:
            self.condition(cond.ONE_GPU, True, "OnOneGPU",
                           f"all {len(reported)} replicas run on GPU {next(iter(by_gpu))} of node {node.name}")
        elif planned == 1:
            self.condition(cond.ONE_GPU, True, "SingleReplica", "one replica holds one slot, which is on one GPU")
        elif spec.placement == Placement.dra:
            self.condition(cond.ONE_GPU, True, "OneClaim",
                           "every replica names the same ResourceClaim, which is allocated one GPU")
        elif node.gpu_count == 1:
            self.condition(cond.ONE_GPU, True, "SingleGPUNode",
                           f"node {node.name} has one GPU (nvidia.com/gpu.count=1), so every slot is on it")
        else:
            count = f"{node.gpu_count} GPUs" if node.gpu_count else "an unlabelled number of GPUs"
            self.condition(cond.ONE_GPU, "Unknown", "NotVerified",
                           f"node {node.name} has {count} and the device plugin may spread the replicas over them: "
                           f"{len(reported)}/{planned} replicas have reported their GPU so far")

    def follow_replicas(self, planned: int) -> None:
        states = list(self.cluster.pods)
        self.status.replica_gpus = [ReplicaGPU(name=s.name, node=s.node, gpu_uuids=list(s.gpu_uuids))
                                    for s in sorted(states, key=lambda s: s.name)]
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


def decide(deployment: dict, cluster: ClusterSnapshot, now: datetime,
           profiler_cluster_role: str = DEFAULT_PROFILER_CLUSTER_ROLE) -> Decision:
    """The operator's decision for one SLMDeployment (metadata, spec, status) on this cluster."""
    return _Decider(deployment, cluster, now, profiler_cluster_role).run()


def with_status(deployment: dict, status: SLMDeploymentStatus) -> dict:
    """The deployment as it reads once `status` is written: the input of the next decision."""
    return {**deployment, "status": status.to_wire()}
