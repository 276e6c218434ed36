"""What the operator reads of the cluster into the decision's snapshot, from the API's own objects."""

from kubernetes import client

from slmpack import GPU_UUIDS_ANNOTATION
from slmpack.controller.handlers import profiling_job, replica_state


def test_a_replicas_gpus_come_from_the_annotation_the_node_exporter_writes():
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="chat-1", annotations={GPU_UUIDS_ANNOTATION: "GPU-aaa, GPU-bbb"}),
        spec=client.V1PodSpec(containers=[], node_name="gpu-8"),
        status=client.V1PodStatus(container_statuses=[client.V1ContainerStatus(
            name="engine", ready=True, restart_count=0, image="e", image_id="", state=client.V1ContainerState())]))
    state = replica_state(pod)
    assert (state.name, state.ready, state.node, state.gpu_uuids) == ("chat-1", True, "gpu-8", ("GPU-aaa", "GPU-bbb"))
    unscheduled = client.V1Pod(metadata=client.V1ObjectMeta(name="chat-2"), spec=client.V1PodSpec(containers=[]),
                               status=client.V1PodStatus())
    assert replica_state(unscheduled).gpu_uuids == () and replica_state(unscheduled).node is None


def test_a_failed_job_carries_the_message_of_its_failed_condition():
    failed = client.V1Job(metadata=client.V1ObjectMeta(name="profile-x"), status=client.V1JobStatus(conditions=[
        client.V1JobCondition(type="Failed", status="True", message="Job has reached the specified backoff limit")]))
    assert profiling_job(failed).failed and "backoff limit" in profiling_job(failed).failure_message
    running = client.V1Job(metadata=client.V1ObjectMeta(name="profile-x"), status=client.V1JobStatus())
    assert not profiling_job(running).failed
