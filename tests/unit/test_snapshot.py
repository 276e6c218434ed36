"""What the operator reads of the cluster into the decision's snapshot, from the objects as the API
(and so kopf's watch caches) holds them."""

from slmpack import GPU_UUIDS_ANNOTATION
from slmpack.controller.handlers import profiling_job, replica_state


def test_a_replicas_gpus_come_from_the_annotation_the_node_exporter_writes():
    pod = {"metadata": {"name": "chat-1", "annotations": {GPU_UUIDS_ANNOTATION: "GPU-aaa, GPU-bbb"}},
           "spec": {"containers": [], "nodeName": "gpu-8"},
           "status": {"containerStatuses": [{"name": "engine", "ready": True, "restartCount": 0, "state": {}}]}}
    state = replica_state(pod)
    assert (state.name, state.ready, state.node, state.gpu_uuids) == ("chat-1", True, "gpu-8", ("GPU-aaa", "GPU-bbb"))
    unscheduled = {"metadata": {"name": "chat-2"}, "spec": {"containers": []}, "status": {}}
    assert replica_state(unscheduled).gpu_uuids == () and replica_state(unscheduled).node is None


def test_a_failed_job_carries_the_message_of_its_failed_condition():
    failed = {"metadata": {"name": "profile-x"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "message": "Job has reached the specified backoff limit"}]}}
    assert profiling_job(failed).failed and "backoff limit" in profiling_job(failed).failure_message
    running = {"metadata": {"name": "profile-x"}, "status": {}}
    assert not profiling_job(running).failed
