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

import math
from dataclasses import dataclass, field, replace
from datetime import datetime

from pydantic import ValidationError

from slmpack.api.models import (
    AutoscalingStatus,
    Device,
    Placement,
    ReplicaGPU,
    RoutingMode,
    SLMDeploymentSpec,
    SLMDeploymentStatus,
    SLMProfileStatus,
)
from slmpack.core import conditions as cond
from slmpack.core.autoscale import (
    EngineLoad,
    MetricsProblem,
    ScalingDecision,
    bounds,
    decide_scale,
    finite_loads,
    metrics_condition,
)
from slmpack.core.dra import (
    DraTarget,
    DraUnavailable,
    build_profiling_claim_template,
    build_resource_claim,
    choose_device,
    claims_to_delete,
    devices_from_slices,
    pack_claim,
    profiling_claim_template_name,
    resolve_gpu_ids,
)
from slmpack.core.gpu_assignments import DRA_PREFIX
from slmpack.core.manifests import (
    DEFAULT_ENGINE_UID,
    DISRUPTION_BUDGET_API_VERSION,
    MANAGED_BY,
    PROFILE_KEY_LABEL,
    PROFILE_LABEL,
    EngineImages,
    Owner,
    build_disruption_budget,
    build_network_policy,
    build_pack_pod,
    build_profile,
    build_profiler_access,
    build_profiling_job,
    build_service,
    build_statefulset,
    controlled_by,
    extension_job_name,
    label_value,
    pack_name,
    profile_conditions,
    profiling_job_name,
    selector_labels,
    service_endpoint,
)
from slmpack.core.packs import assign_nodes, in_pack, layout, pack_status, packs_for, pinned, ready_engines
from slmpack.core.planner import plan
from slmpack.core.replication import missing_measurements
from slmpack.core.router import (
    DEFAULT_IMAGES,
    ROUTER_CLUSTER_ROLE,
    RouterImages,
    build_engines_service,
    build_inference_pool,
    build_router,
    build_router_access,
    build_router_config,
    build_router_disruption_budget,
    build_router_network_policy,
    router_selector,
)
from slmpack.core.validation import (
    NO_HOST_PATHS,
    GPUNode,
    HostPathPolicy,
    InvalidSpec,
    NoMatchingNode,
    choose_node,
    host_path_problems,
    parse_spec,
    spec_problems,
)

# How long to wait before looking for a matching GPU node again.
NODE_RETRY_SECONDS = 30
# The profiler writes its result before it exits, but the profile's watch may lag the Job's.
RESULT_GRACE_SECONDS = 30
DEFAULT_PROFILER_CLUSTER_ROLE = "slmpack-profiler"
DEFAULT_ENGINE_IMAGES = EngineImages()


def measured_under(spec: SLMDeploymentSpec, node: GPUNode):
    """The conditions a profile for this spec on this node is measured under, and keyed by: the
    device plugin's R slots too, since its MPS daemon caps each engine at 1/R; on CPU the dtype
    that `auto` means for the node's CPU, where NFD labels its features."""
    plugin = spec.placement == Placement.device_plugin and spec.engine.device == Device.gpu
    return profile_conditions(spec, node.gpu_memory_mib, node.sharing_slots if plugin else None, node.cpu_flags)


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
    # The deployment's ResourceClaims (DRA), as the API returns them.
    resource_claims: tuple[dict, ...] = ()
    # The deployment's StatefulSets (one per pack), as the API returns them: a pack no longer wanted is deleted.
    statefulsets: tuple[dict, ...] = ()
    # With spec.autoscaling: the engines' load, read from each replica's /metrics, and why some gave none.
    engine_loads: tuple[EngineLoad, ...] = ()
    engine_problems: tuple[MetricsProblem, ...] = ()
    # The deployment's router pods, whose readings among engine_loads are the requests queued at them.
    router_pods: tuple[str, ...] = ()
    # With spec.routing.mode router: the router pods that are ready. The deployment's Service reaches the
    # engines directly until one is, so clients never meet a Service without endpoints (a new deployment,
    # or one from before the router).
    routers_ready: int = 0
    # The deployment's router Deployments, as the API returns them: deleted once spec.routing leaves router mode.
    routers: tuple[dict, ...] = ()
    # The deployment's NetworkPolicies, as the API returns them: one no longer wanted is deleted.
    network_policies: tuple[dict, ...] = ()
    # The NetworkPolicy peer that selects the operator's own pods, which read the engines' /metrics.
    operator_peer: dict | None = None
    # The PodDisruptionBudget version the apiserver serves (policy/v1beta1 before Kubernetes 1.21).
    disruption_budget_api_version: str = DISRUPTION_BUDGET_API_VERSION
    # (kind, name) of objects in the namespace that have a name the decision wants but are not controlled by the
    # deployment, found when applying them: they carry none of its labels, so no watch shows them.
    names_taken: tuple[tuple[str, str], ...] = ()


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
    # Deleted as read (the adapter makes the read a precondition): a DRA pack's earlier claims no pod uses,
    # and the StatefulSets of packs no longer wanted.
    delete: list[dict] = field(default_factory=list)
    # With spec.autoscaling: what the autoscaler decided this time.
    scaling: ScalingDecision | None = None
    events: list[Event] = field(default_factory=list)
    # invalid | waiting | profiling | placed
    outcome: str = "placed"
    # Try again after this many seconds even when nothing changes (a node may join).
    retry_after_seconds: int | None = None
    # Set once, when the profile turns Ready: how long it took to measure.
    profiling_seconds: float | None = None


def with_dra_uuids(cluster: ClusterSnapshot) -> ClusterSnapshot:
    """The snapshot with the GPUs a DRA driver allocated (as the exporters publish them) named by UUID."""
    if not any(i.startswith(DRA_PREFIX) for pod in cluster.pods for i in pod.gpu_uuids):
        return cluster
    devices = devices_from_slices(cluster.resource_slices)
    return replace(cluster, pods=tuple(replace(pod, gpu_uuids=resolve_gpu_ids(pod.gpu_uuids, devices))
                                       for pod in cluster.pods))


class _Decider:
    """One decision; collects conditions and Events as it goes."""

    def __init__(self, deployment: dict, cluster: ClusterSnapshot, now: datetime, profiler_cluster_role: str,
                 host_paths: HostPathPolicy, router_images: RouterImages = DEFAULT_IMAGES,
                 router_cluster_role: str = ROUTER_CLUSTER_ROLE):
        self.cluster, self.now, self.profiler_cluster_role = with_dra_uuids(cluster), now, profiler_cluster_role
        self.host_paths = host_paths
        self.router_images, self.router_cluster_role = router_images, router_cluster_role
        self.meta = deployment["metadata"]
        self.namespace, self.name = self.meta["namespace"], self.meta["name"]
        self.generation = self.meta.get("generation")
        self.before = SLMDeploymentStatus.from_stored(deployment.get("status"))
        status = self.before.model_copy(deep=True)
        status.observed_generation = self.generation
        self.decision = Decision(status=status)
        self.warnings: dict[str, bool] = {}
        self.news_when_new: dict[str, bool] = {}
        self.raw_spec = deployment.get("spec") or {}
        self.dra: DraTarget | None = None
        self.engine_images = EngineImages()
        self.engine_uid = DEFAULT_ENGINE_UID

    @property
    def status(self) -> SLMDeploymentStatus:
        return self.decision.status

    def owner(self) -> Owner:
        return Owner(kind="SLMDeployment", name=self.name, uid=self.meta.get("uid", ""), namespace=self.namespace)

    def condition(self, type_: str, ok: bool | str, reason: str, message: str, warn: bool = False,
                  news_when_new: bool = True) -> None:
        """Set a condition; an Event follows when its reason or message ends up changed, and when it is first
        set unless `news_when_new` is False."""
        self.status.conditions = cond.set_condition(self.status.conditions, type_, ok, reason, message, self.now,
                                                    self.generation)
        self.warnings[type_] = warn
        self.news_when_new[type_] = news_when_new

    def finish(self, outcome: str) -> Decision:
        for condition in self.status.conditions:
            previous = cond.get_condition(self.before.conditions, condition.type)
            if previous is None and not self.news_when_new.get(condition.type, True):
                continue
            if previous is None or (previous.reason, previous.message) != (condition.reason, condition.message):
                self.decision.events.append(Event(condition.reason, condition.message,
                                                  self.warnings.get(condition.type, False)))
        self.status.phase = cond.derive_phase(self.status.conditions)
        self.decision.outcome = outcome
        return self.decision

    # ---- the steps

    def run(self) -> Decision:
        try:
            spec = self.engine_images.fill(parse_spec(self.raw_spec))
            problems = spec_problems(spec) + host_path_problems(spec, self.host_paths)
            if problems:
                raise InvalidSpec("; ".join(problems))
            if spec.placement == Placement.dra:
                self.dra = choose_device(spec, self.cluster.resource_api_versions, self.cluster.resource_slices)
                node = self.dra.node()
            else:
                node = choose_node(spec, list(self.cluster.nodes))
        except DraUnavailable as error:
            # Not the spec's fault: the cluster may turn DRA on or get the driver later.
            self.condition(cond.INVALID_SPEC, False, "SpecValid", "the spec is valid", news_when_new=False)
            self.condition(cond.PLACED, False, error.reason, str(error), warn=True)
            self.decision.retry_after_seconds = NODE_RETRY_SECONDS
            return self.finish("waiting")
        except InvalidSpec as error:
            self.condition(cond.INVALID_SPEC, True, "InvalidSpec", str(error), warn=True)
            if isinstance(error, NoMatchingNode):
                # The status says why; a matching node may join or be labelled later.
                self.decision.retry_after_seconds = NODE_RETRY_SECONDS
            return self.finish("invalid")
        # A spec valid from the start is no news; one that becomes valid after a refusal is.
        self.condition(cond.INVALID_SPEC, False, "SpecValid", "the spec is valid and a GPU node matches",
                       news_when_new=False)

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
            key = measured_under(spec, node).key()
            existing = sorted((p for p in self.cluster.profiles
                               if p["metadata"].get("labels", {}).get(PROFILE_KEY_LABEL) == key),
                              key=lambda p: p["metadata"]["name"])
            ready = [p for p in existing if (p.get("status") or {}).get("phase") == "Ready"]
            profile = (ready or existing or [None])[0]
            if profile is None:
                profile = build_profile(self.namespace, measured_under(spec, node), spec)
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
        try:
            measured = SLMProfileStatus.from_stored(profile.get("status"))
        except ValidationError as error:  # written by another version of slmpack, or by hand
            wrong = "; ".join(f"status.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            self.condition(cond.PROFILE_READY, False, "ProfileUnreadable",
                           f"SLMProfile {name} has a status this operator cannot read ({wrong}): fix its status, "
                           f"or delete SLMProfile {name} to profile again", warn=True)
            return None
        if measured.phase == "Ready" and measured.knee is not None:
            missing = missing_measurements(measured, spec.profiling)
            extending = missing is not None and MANAGED_BY.items() <= labels.items()
            if extending and self.extend_profile(spec, node, profile, missing):
                return None
            newly_ready = not cond.is_true(self.before.conditions, cond.PROFILE_READY)
            if newly_ready and measured.sweep and measured.sweep.duration_s:
                self.decision.profiling_seconds = measured.sweep.duration_s
            self.status.profiling_phase = None
            if not extending:  # else the extension's failure stays said
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

    def extend_profile(self, spec: SLMDeploymentSpec, node: GPUNode, profile: dict, missing: str) -> bool:
        """Whether the deployment waits while a Job adds what its SLO needs to the shared profile, which stays Ready
        for the deployments already using it. An extension that failed, or ended without adding it, is reported,
        and the deployment places from what the profile has."""
        name, uid = profile["metadata"]["name"], profile["metadata"].get("uid")
        job_name = extension_job_name(name, spec.profiling)
        job = next((j for j in self.cluster.jobs if j.name == job_name), None)
        if job is not None and (job.failed or job.completed_at is not None
                                and (self.now - job.completed_at).total_seconds() >= RESULT_GRACE_SECONDS):
            why = f"failed: {job.failure_message}" if job.failed else "completed without adding it"
            self.condition(cond.PROFILE_READY, True, "ProfileExtensionFailed",
                           f"SLMProfile {name} lacks what this deployment's SLO needs ({missing}), and profiling Job "
                           f"{job_name} that was to add it {why}. The plan uses what the profile has; delete Job "
                           f"{job_name} to try again", warn=True)
            return False
        if job is None and uid:
            owner = Owner(kind="SLMProfile", name=name, uid=uid, namespace=self.namespace)
            self.decision.create += build_profiler_access(self.namespace, self.profiler_cluster_role)
            template = profiling_claim_template_name(name) if self.dra is not None else None
            self.decision.create.append(build_profiling_job(owner, measured_under(spec, node), spec,
                                                            None if self.dra else node, claim_template=template,
                                                            name=job_name, uid=self.engine_uid))
            self.decision.events.append(Event("ProfileExtending", f"SLMProfile {name} lacks what this "
                                                                  f"deployment's SLO needs ({missing}): profiling Job "
                                                                  f"{job_name} adds it"))
        self.status.profiling_phase = None
        self.condition(cond.PROFILE_READY, False, "ProfileExtending",
                       f"SLMProfile {name} lacks what this deployment's SLO needs ({missing}): profiling Job "
                       f"{job_name} adds it, while the deployments already using the profile keep it",
                       news_when_new=False)
        return True

    def profile_in_progress(self, spec: SLMDeploymentSpec, node: GPUNode, profile: dict,
                            measured: SLMProfileStatus) -> None:
        name, uid = profile["metadata"]["name"], profile["metadata"].get("uid")
        job_name = profiling_job_name(name)
        job = next((j for j in self.cluster.jobs if j.name == job_name), None)
        if job is None and measured.phase != "Failed" and uid:
            # The Job is owned by the profile, so it waits for the profile's uid (the next decision).
            self.decision.create += build_profiler_access(self.namespace, self.profiler_cluster_role)
            owner = Owner(kind="SLMProfile", name=name, uid=uid, namespace=self.namespace)
            conditions = measured_under(spec, node)
            if self.dra is not None:
                # Its own claim gives the Job a GPU; the scheduler picks the node.
                labels = {PROFILE_LABEL: label_value(name), **MANAGED_BY}
                self.decision.create.append(build_profiling_claim_template(owner, spec, self.dra.api_version,
                                                                           labels))
                template = profiling_claim_template_name(name)
                self.decision.create.append(build_profiling_job(owner, conditions, spec, None,
                                                                claim_template=template, uid=self.engine_uid))
                where = f"on a GPU of ResourceClaimTemplate {template}"
            else:
                self.decision.create.append(build_profiling_job(owner, conditions, spec, node, uid=self.engine_uid))
                where = f"on node {node.name}"
            self.decision.events.append(Event("ProfilingStarted", f"profiling Job {job_name} started {where}"))
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
        # DRA nodes carry no device-plugin sharing slots, and a pack pod's engines share its whole GPU.
        slots = None if self.dra or spec.placement == Placement.pack_pod else node.sharing_slots
        decided = plan(spec, profile, node.gpu_memory_mib, slots, plugin_mps, node_cpus=node.allocatable.get("cpu"))
        self.check_slo(spec, decided)
        owner = self.owner()
        sizes = self.pack_sizes(spec, decided.replicas, decided.knee_batch_size or decided.max_num_seqs)
        names = [pack_name(self.name, i) for i in range(len(sizes))]
        previous = {names.index(p.name): p.node for p in self.before.packs if p.name in names and p.node}
        nodes = assign_nodes(spec, node, self.cluster.nodes, len(sizes), previous) if pinned(spec) \
            else [None] * len(sizes)
        routers = {"podSelector": {"matchLabels": router_selector(self.name)}} \
            if spec.routing.mode == RoutingMode.router else None
        pack_pod = spec.placement == Placement.pack_pod
        policies = [build_network_policy(owner, spec, self.cluster.operator_peer, routers,
                                         sizes if pack_pod else ())] if spec.network_policy else []
        if policies and routers:
            policies.append(build_router_network_policy(owner, spec, self.cluster.operator_peer))
        wanted = {p["metadata"]["name"] for p in policies}
        self.decision.delete += [p for p in self.cluster.network_policies
                                 if controlled_by(p, owner.uid) and p["metadata"]["name"] not in wanted]
        budget = build_disruption_budget(owner, self.cluster.disruption_budget_api_version)
        objects = [build_service(owner, spec, self.service_selector(spec)), budget, *policies,
                   *self.routing(spec, decided)]
        claims: list[str | None] = [None] * len(sizes)
        if self.dra is not None:
            for i, name in enumerate(names):
                claim = build_resource_claim(owner, spec, decided, self.dra.api_version, pack=name if i else None)
                self.decision.create.append(claim)
                claims[i] = claim["metadata"]["name"]
            in_use = {name for pod in self.cluster.pods for name in pod.claims} | set(claims)
            current = claims[0] if claims else pack_claim(self.name, spec, decided).name
            ours = [c for c in self.cluster.resource_claims if controlled_by(c, owner.uid)]
            for unused in claims_to_delete(ours, in_use, current):
                self.decision.delete.append(unused)
                self.decision.events.append(Event("ResourceClaimReleased", f"ResourceClaim {unused['metadata']['name']}"
                                                  " of an earlier plan: no replica uses it, so it is deleted"))
            earlier = [c for c in self.cluster.resource_claims if c["metadata"]["name"] not in claims]
            if len(earlier) > len(self.decision.delete):
                # An earlier claim is still held while the pods roll over: look again, as no event may follow.
                self.decision.retry_after_seconds = NODE_RETRY_SECONDS
        wanted = {("StatefulSet", name) for name in names} | {(o["kind"], o["metadata"]["name"]) for o in objects}
        labelled = sorted(f"{o['kind']} {o['metadata']['name']}"
                          for o in (*self.cluster.statefulsets, *self.cluster.routers, *self.cluster.network_policies)
                          if (o["kind"], o["metadata"]["name"]) in wanted and not controlled_by(o, owner.uid))
        unlabelled = sorted(f"{kind} {name}" for kind, name in self.cluster.names_taken if (kind, name) in wanted)
        # Adopting either would take over another's pods, Service or policy, or fail on its controller reference.
        if labelled or unlabelled:
            found = [f"{', '.join(labelled)} in {self.namespace} carries this deployment's labels"] if labelled else []
            found += [f"{', '.join(unlabelled)} in {self.namespace} exists"] if unlabelled else []
            if unlabelled:  # no watch shows when it goes
                self.decision.retry_after_seconds = NODE_RETRY_SECONDS
            raise InvalidSpec(f"{' and '.join(found)} but is not controlled by it: delete or rename it, or rename "
                              f"SLMDeployment {self.name}")
        unplaced = [name for name, on in zip(names, nodes, strict=True) if pinned(spec) and on is None]
        existing_policies = {o["metadata"]["name"]: o["spec"]["podManagementPolicy"]
                             for o in self.cluster.statefulsets if o.get("spec", {}).get("podManagementPolicy")}
        statefulsets = [build_pack_pod(owner, spec, decided, nodes[i], pack=i, engines=size, uid=self.engine_uid)
                        if pack_pod else build_statefulset(owner, spec, decided, nodes[i], claims[i], pack=i,
                                                           replicas=size, uid=self.engine_uid)
                        for i, size in enumerate(sizes) if names[i] not in unplaced]
        for statefulset in statefulsets:  # immutable: a pack made before keeps the policy it was made with
            statefulset["spec"]["podManagementPolicy"] = existing_policies.get(
                statefulset["metadata"]["name"], statefulset["spec"]["podManagementPolicy"])
        for old in sorted(self.cluster.statefulsets, key=lambda o: o["metadata"]["name"]):
            if old["metadata"]["name"] not in names and controlled_by(old, owner.uid):
                self.decision.delete.append(old)
                self.decision.events.append(Event("PackRemoved", f"StatefulSet {old['metadata']['name']} is no "
                                                  "longer wanted: its replicas drain and stop"))
        self.decision.apply += [*objects, *statefulsets]
        self.status.plan, self.status.replicas = decided, sum(sizes)
        self.status.endpoint = service_endpoint(owner, spec)
        self.status.current_packs = len(sizes) - len(unplaced)
        self.status.selector = ",".join(f"{k}={v}" for k, v in selector_labels(self.name).items())
        self.status.packs = [pack_status(name, nodes[i], sizes[i], self.cluster.pods, pack_pod)
                             for i, name in enumerate(names)]
        if spec.engine.device == Device.cpu:
            where = "on the CPU"
        elif self.dra is not None:
            claim_names = ", ".join(c for c in claims if c)
            where = (f"sharing the GPU of ResourceClaim {claim_names} ({self.dra.api_version}, "
                     f"{self.dra.candidates} matching GPU(s) published) by {spec.sharing.value}")
        elif pack_pod:
            how = "under the pod's own MPS daemon" if spec.sharing.value == "mps" else "by time-slicing"
            where = f"in one pod on node {node.name} holding one whole GPU, {how}"
        elif node.sharing_strategy == "none":
            where = f"on node {node.name} on a whole GPU (the node does not share its GPUs)"
        else:
            where = f"on node {node.name} sharing one GPU by {spec.sharing.value}"
        if len(sizes) != 1:
            on = sorted({n.name for n in nodes if n is not None})
            where = f"in {len(sizes)} packs of up to {decided.replicas}" + (f" on node(s) {', '.join(on)}" if on
                                                                             else "")
            each = ", each one pod holding one whole GPU" if pack_pod else \
                f", each sharing one GPU by {spec.sharing.value}"
            where += " on the CPU" if spec.engine.device == Device.cpu else each
        if unplaced:
            self.condition(cond.PLACED, False, "NoFreeGPU",
                           f"{len(unplaced)} of {len(sizes)} packs ({', '.join(unplaced)}) have no node with a free "
                           f"GPU like node {node.name}'s: add such a node or lower spec.packs "
                           "(spec.autoscaling.maxPacks)", warn=True)
            self.decision.retry_after_seconds = NODE_RETRY_SECONDS
        else:
            self.condition(cond.PLACED, True, "StatefulSetApplied",
                           f"{sum(sizes)} replica(s) {where}: {decided.explanation}")
        self.follow_replicas(sum(sizes), [(name, sizes[i]) for i, name in enumerate(names)] if pack_pod else None)
        if spec.engine.device == Device.gpu:
            self.check_one_gpu(spec, [(name, nodes[i] or node, sizes[i]) for i, name in enumerate(names)])

    def service_selector(self, spec: SLMDeploymentSpec) -> dict[str, str]:
        """Whom the deployment's Service reaches: the routers once one is ready, the engines otherwise."""
        if spec.routing.mode == RoutingMode.router and self.cluster.routers_ready > 0:
            return router_selector(self.name)
        if spec.placement == Placement.pack_pod:  # only the router reaches a pack pod's engines, one port each
            return router_selector(self.name)
        return selector_labels(self.name)

    def routing(self, spec: SLMDeploymentSpec, decided) -> list[dict]:
        """The objects of spec.routing: the router and what it needs, or an InferencePool, or none."""
        owner = self.owner()
        if spec.routing.mode != RoutingMode.router:
            # The Service already reaches the engines again; the routers' pods would only idle. Their
            # configuration and headless Service are small and go with the deployment.
            for router in self.cluster.routers:
                if controlled_by(router, owner.uid):
                    self.decision.delete.append(router)
                    self.decision.events.append(Event("RouterRemoved", f"Deployment {router['metadata']['name']}: "
                                                      f"spec.routing.mode is {spec.routing.mode.value}"))
        if spec.routing.mode == RoutingMode.inference_pool:
            return [build_inference_pool(owner, spec)]
        if spec.routing.mode != RoutingMode.router:
            return []
        budget = [build_router_disruption_budget(owner, self.cluster.disruption_budget_api_version)] \
            if spec.routing.router_replicas > 1 else []
        engines = decided.replicas if spec.placement == Placement.pack_pod else None
        return [*build_router_access(self.namespace, self.router_cluster_role),
                build_engines_service(owner, spec, engines),
                build_router_config(owner, spec), build_router(owner, spec, decided, self.router_images), *budget]

    def check_slo(self, spec: SLMDeploymentSpec, decided) -> None:
        """SLOMet: whether the plan's measured point meets the deployment's latency SLO (absent without one)."""
        slo = spec.profiling.slo
        if not (slo.p99_itl_ms or slo.p99_ttft_ms):
            self.status.conditions = [c for c in self.status.conditions if c.type != cond.SLO_MET]
        elif decided.slo_miss:
            self.condition(cond.SLO_MET, False, "SLOUnreachable",
                           f"{decided.slo_miss}: relax spec.profiling.slo, or use a faster GPU or a smaller model",
                           warn=True)
        elif decided.predicted_p99_itl_ms is not None:
            self.condition(cond.SLO_MET, True, "MeasuredWithinSLO",
                           f"measured p99 ITL {decided.predicted_p99_itl_ms:.0f} ms at {decided.replicas} replica(s) "
                           f"of batch {decided.max_num_seqs}, within the SLO")
        else:
            self.condition(cond.SLO_MET, "Unknown", "NotMeasured",
                           f"{decided.replicas} replica(s) of batch {decided.max_num_seqs} were not measured")

    def pack_sizes(self, spec: SLMDeploymentSpec, per_pack: int, knee_batch: int) -> list[int]:
        """Replicas per pack: spec.packs full packs, or what the autoscaler decides (an Event when it changes)."""
        policy = spec.autoscaling
        if policy is None:
            self.status.autoscaling = None
            self.status.conditions = cond.without_condition(self.status.conditions, cond.METRICS_AVAILABLE)
            return [per_pack] * spec.packs
        pack_pod = spec.placement == Placement.pack_pod
        low, high = bounds(policy, per_pack, whole_packs=pack_pod)
        before = self.before.autoscaling
        current = before.replicas if before else min(max(self.before.replicas or low, low), high)
        names = [pack_name(self.name, i) for i in range(packs_for(current, per_pack))]
        mine = [p for p in self.cluster.pods if any(in_pack(name, p.name) for name in names)]
        loads, refused = finite_loads([e for e in self.cluster.engine_loads if any(in_pack(n, e.pod) for n in names)])
        problems = refused + [p for p in self.cluster.engine_problems if any(in_pack(n, p.pod) for n in names)]
        readable, reason, message = metrics_condition(problems)
        self.condition(cond.METRICS_AVAILABLE, readable, reason, message, warn=not readable, news_when_new=not readable)
        queued = sum(e.waiting for e in self.cluster.engine_loads if e.pod in self.cluster.router_pods
                     and math.isfinite(e.waiting))
        # A queue at the routers is demand the capped engines do not show, once it has lasted a whole period.
        queued_since = ((before.queued_since if before else None) or self.now) if queued > 0 else None
        lasted = queued_since is not None and (self.now - queued_since).total_seconds() >= policy.period_seconds
        sizes = layout(current, per_pack)
        ready = sum(ready_engines(name, sizes[i], mine, pack_pod) for i, name in enumerate(names))
        choice = decide_scale(policy, current, per_pack, knee_batch, names, loads, ready,
                              before.last_scale_time if before else None, self.now, queued if lasted else 0.0,
                              whole_packs=pack_pod)
        self.decision.scaling = choice
        last = self.now if choice.changed else (before.last_scale_time if before else None)
        self.status.autoscaling = AutoscalingStatus(replicas=choice.replicas, last_scale_time=last,
                                                    load_per_replica=choice.load_per_replica, reason=choice.reason,
                                                    message=choice.message, queued_since=queued_since)
        if choice.changed:
            self.decision.events.append(Event(f"Scaled{choice.direction.capitalize()}",
                                              f"{current} -> {choice.replicas} replicas ({choice.reason}): "
                                              f"{choice.message}"))
        elif before is None or before.reason != choice.reason:
            # A hold is posted when its reason changes, not at every look.
            self.decision.events.append(Event(f"Scaling{choice.reason}", choice.message))
        retry = policy.period_seconds
        self.decision.retry_after_seconds = min(self.decision.retry_after_seconds or retry, retry)
        return layout(choice.replicas, per_pack)

    def check_one_gpu(self, spec: SLMDeploymentSpec, packs: list[tuple[str, GPUNode, int]]) -> None:
        """Whether each pack shares one physical GPU, and no two packs share one: verified from the UUIDs the
        node reports per replica, guaranteed by the mechanism where it can be (one DRA claim per pack, or a
        node with one GPU)."""
        owners: dict[str, set[str]] = {}
        verdicts = []
        for name, node, planned in packs:
            pods = sorted((p for p in self.cluster.pods if in_pack(name, p.name)), key=lambda p: p.name)
            for uuid in {u for p in pods for u in p.running_gpu_uuids or p.gpu_uuids}:
                owners.setdefault(uuid, set()).add(name)
            verdicts.append(self.one_gpu_verdict(spec, node, planned, pods, name if len(packs) > 1 else None))
        shared = sorted((uuid, sorted(names)) for uuid, names in owners.items() if len(names) > 1)
        if shared:
            where = "; ".join(f"{', '.join(names)} on {uuid}" for uuid, names in shared)
            self.condition(cond.ONE_GPU, False, "PacksShareAGPU",
                           f"packs share a GPU ({where}), so they contend for it. The device plugin spreads shared "
                           "slots over a node's GPUs: use placement dra, or nodes with one GPU "
                           "(nvidia.com/gpu.count=1)", warn=True)
            return
        for status in ("False", "Unknown"):
            failing = [v for v in verdicts if v[0] == status]
            if failing:
                self.condition(cond.ONE_GPU, status, failing[0][1], "; ".join(v[2] for v in failing),
                               warn=status == "False")
                return
        if verdicts:
            reasons = {v[1] for v in verdicts}
            self.condition(cond.ONE_GPU, True, verdicts[0][1] if len(reasons) == 1 else "OnOneGPUEach",
                           "; ".join(v[2] for v in verdicts))

    def one_gpu_verdict(self, spec: SLMDeploymentSpec, node: GPUNode, planned: int, pods: list,
                        pack: str | None) -> tuple[str, str, str]:
        """(status, reason, message) of OneGPU for one pack; `pack` names it when there are several."""
        the = f"pack {pack}" if pack else "the pack"
        # Where the processes run, where NVML shows it: the plugin's MPS clients see every GPU, so an engine
        # that did not pin itself runs on another GPU than its slot's.
        astray = [p for p in pods if p.running_gpu_uuids and not set(p.running_gpu_uuids) <= set(p.gpu_uuids)]
        if astray:
            where = "; ".join(f"{p.name} was given {', '.join(p.gpu_uuids) or 'no GPU'} but runs on "
                              f"{', '.join(p.running_gpu_uuids)}" for p in astray)
            return ("False", "RunsOffItsGPU",
                    f"{where} (node {node.name}). The device plugin's MPS clients see every GPU of the node: the "
                    "engine must pin itself (the engine image's `slmpack engine` sets CUDA_VISIBLE_DEVICES to the "
                    "GPUs its container was given); a custom command or image skips that")
        by_gpu: dict[str, list[str]] = {}
        for pod in pods:
            for uuid in pod.running_gpu_uuids or pod.gpu_uuids:
                by_gpu.setdefault(uuid, []).append(pod.name)
        if len(by_gpu) > 1:
            where = "; ".join(f"{', '.join(names)} on {uuid}" for uuid, names in sorted(by_gpu.items()))
            return ("False", "SplitAcrossGPUs",
                    f"{the} is split over {len(by_gpu)} GPUs of node {node.name} ({where}), so its "
                    "replicas do not share one GPU. The device plugin spreads shared slots over a node's "
                    "GPUs: use placement dra (one ResourceClaim, one GPU), or nodes with one GPU "
                    "(nvidia.com/gpu.count=1); the plugin's packed allocation policy is best effort")
        if spec.placement == Placement.pack_pod:
            on = f" ({next(iter(by_gpu))})" if by_gpu else ""
            return "True", "OnePodOneGPU", f"{the} is one pod holding one whole GPU{on} of a node that does not " \
                                           f"share its GPUs, so its {planned} engine(s) run on that GPU"
        reported = [p for p in pods if p.gpu_uuids]
        if by_gpu and len(reported) >= planned:
            return "True", "OnOneGPU", f"all {len(reported)} replicas{' of ' + pack if pack else ''} run on GPU " \
                                       f"{next(iter(by_gpu))} of node {node.name}"
        if planned == 1:
            return "True", "SingleReplica", f"one replica{' in ' + pack if pack else ''} holds one slot, which is " \
                                            "on one GPU"
        if spec.placement == Placement.dra:
            return "True", "OneClaim", f"every replica of {the} names the same ResourceClaim, which is allocated " \
                                       "one GPU"
        if node.gpu_count == 1:
            return "True", "SingleGPUNode", f"node {node.name} has one GPU (nvidia.com/gpu.count=1), so every slot " \
                                            "is on it"
        count = f"{node.gpu_count} GPUs" if node.gpu_count else "an unlabelled number of GPUs"
        return ("Unknown", "NotVerified",
                f"node {node.name} has {count} and the device plugin may spread the replicas over them: "
                f"{len(reported)}/{planned} replicas{' of ' + pack if pack else ''} have reported their GPU so far")

    def follow_replicas(self, planned: int, pack_pods: list[tuple[str, int]] | None = None) -> None:
        """Available: the engines that serve against those planned; `pack_pods` (pack, engines) when each pack
        is one pod whose engines serve together."""
        states = list(self.cluster.pods)
        self.status.replica_gpus = [ReplicaGPU(name=s.name, node=s.node, gpu_uuids=list(s.gpu_uuids))
                                    for s in sorted(states, key=lambda s: s.name)]
        ready = sum(s.ready for s in states) if pack_pods is None else \
            sum(ready_engines(name, engines, states, True) for name, engines in pack_pods)
        self.status.ready_replicas = ready
        problem = cond.replica_problem(states)
        if problem:
            self.condition(cond.AVAILABLE, False, "ReplicaFailing", problem, warn=True)
        elif ready >= planned:
            self.condition(cond.AVAILABLE, True, "ReplicasReady", f"{ready}/{planned} replicas ready")
        elif unplaced := cond.unplaced_replica(states):
            # Often a wait, not a fault: GPU slots or memory that pods still stopping hold come free.
            self.condition(cond.AVAILABLE, False, "ReplicaUnschedulable", f"{ready}/{planned} replicas ready; "
                           f"{unplaced}", warn=True)
        else:
            self.condition(cond.AVAILABLE, False, "ReplicasStarting",
                           f"{ready}/{planned} replicas ready; they start one by one")


def decide(deployment: dict, cluster: ClusterSnapshot, now: datetime,
           profiler_cluster_role: str = DEFAULT_PROFILER_CLUSTER_ROLE,
           host_paths: HostPathPolicy = NO_HOST_PATHS, router_images: RouterImages = DEFAULT_IMAGES,
           router_cluster_role: str = ROUTER_CLUSTER_ROLE,
           engine_images: EngineImages = DEFAULT_ENGINE_IMAGES, engine_uid: int = DEFAULT_ENGINE_UID) -> Decision:
    """The operator's decision for one SLMDeployment (metadata, spec, status) on this cluster; `host_paths`
    are the node directories the cluster admin lets deployments mount (none by default); `router_images`
    and `router_cluster_role` are what the routers run and may read (the chart's); `engine_images` the
    images of deployments that name none; `engine_uid` the UID and GID the engines and profilers run as."""
    decider = _Decider(deployment, cluster, now, profiler_cluster_role, host_paths, router_images,
                       router_cluster_role)
    decider.engine_images = engine_images
    decider.engine_uid = engine_uid
    return decider.run()


def with_status(deployment: dict, status: SLMDeploymentStatus) -> dict:
    """The deployment as it reads once `status` is written: the input of the next decision."""
    return {**deployment, "status": status.to_wire()}
