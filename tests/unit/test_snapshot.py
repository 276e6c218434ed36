"""What the operator reads of the cluster into the decision's snapshot, from the objects as the API
(and so kopf's watch caches) holds them."""

from slmpack.controller.handlers import profiling_job, replica_state, with_gpus
from slmpack.core.gpu_assignments import build_gpu_assignments, gpus_by_pod_uid


def test_a_replicas_gpus_come_from_the_config_map_its_nodes_exporter_writes():
    pod = {"metadata": {"name": "chat-1", "uid": "u-1", "annotations": {"slmpack.dev/gpu-uuids": "GPU-forged"}},
           "spec": {"containers": [], "nodeName": "gpu-8"},
           "status": {"containerStatuses": [{"name": "engine", "ready": True, "restartCount": 0, "state": {}}]}}
    published = gpus_by_pod_uid([build_gpu_assignments("gpu-8", "slmpack-system",
                                                       {("ai", "chat-1", "u-1"): "GPU-aaa,GPU-bbb"})])
    (state,) = with_gpus((replica_state(pod),), published)
    assert (state.name, state.ready, state.node, state.gpu_uuids) == ("chat-1", True, "gpu-8", ("GPU-aaa", "GPU-bbb"))
    # A pod annotation is not read: whoever may edit the pod could claim any GPU with it.
    assert replica_state(pod).gpu_uuids == ()
    unscheduled = {"metadata": {"name": "chat-2"}, "spec": {"containers": []}, "status": {}}
    assert with_gpus((replica_state(unscheduled),), published)[0].gpu_uuids == ()
    assert replica_state(unscheduled).node is None
    assert replica_state(unscheduled).unschedulable is None  # not yet looked at by the scheduler
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/1 nodes are available"}
    refused = {**unscheduled, "status": {"conditions": [scheduled]}}
    assert replica_state(refused).unschedulable == "0/1 nodes are available"


def test_a_failed_job_carries_the_message_of_its_failed_condition():
    failed = {"metadata": {"name": "profile-x"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "message": "Job has reached the specified backoff limit"}]}}
    assert profiling_job(failed).failed and "backoff limit" in profiling_job(failed).failure_message
    running = {"metadata": {"name": "profile-x"}, "status": {}}
    assert not profiling_job(running).failed
