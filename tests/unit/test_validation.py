"""Cross-field rules and node choice: each problem names the field and the fix."""

import pytest

from slmpack.core.validation import GPUNode, InvalidSpec, choose_node, parse_spec, spec_problems

H100 = GPUNode("gpu-a", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.replicas": "4",
                         "nvidia.com/gpu.sharing-strategy": "mps", "nvidia.com/gpu.memory": "81559"},
               {"nvidia.com/gpu": 4})
L4 = GPUNode("gpu-b", {"nvidia.com/gpu.product": "NVIDIA-L4", "nvidia.com/gpu.sharing-strategy": "time-slicing",
                       "nvidia.com/gpu.replicas": "2"}, {"nvidia.com/gpu": 2})


def parse(**spec):
    return parse_spec({"model": {"name": "m"}, **spec})


@pytest.mark.parametrize("spec, field", [
    ({"profiling": {"minBatchSize": 64, "maxBatchSize": 8}}, "spec.profiling.minBatchSize"),
    ({"profiling": {"batchSizes": [4, 8, 4]}}, "spec.profiling.batchSizes"),
    ({"model": {"name": "/models/m", "volume": {}}}, "spec.model.volume"),
    ({"model": {"name": "m", "volume": {"hostPath": "/srv"}}}, "spec.model.name"),
    ({"model": {"name": "m", "maxModelLen": 256}, "profiling": {"workload": {"inputTokens": 200}}},
     "spec.profiling.workload"),
    ({"placement": "dra", "gpu": {"resourceName": "nvidia.com/gpu.shared"}}, "spec.gpu.resourceName"),
])
def test_cross_field_problems_name_the_field(spec, field):
    problems = spec_problems(parse(**spec))
    assert len(problems) == 1 and problems[0].startswith(field), problems


def test_schema_errors_name_the_field():
    with pytest.raises(InvalidSpec, match=r"spec\.sharing: Input should be 'mps' or 'time-slicing'"):
        parse_spec({"model": {"name": "m"}, "sharing": "mig"})


def test_node_choice_follows_product_and_sharing():
    assert choose_node(parse(gpu={"product": "NVIDIA-H100-80GB-HBM3"}), [H100, L4]).name == "gpu-a"
    assert choose_node(parse(sharing="time-slicing"), [H100, L4]).name == "gpu-b"
    with pytest.raises(InvalidSpec, match=r"no node offers nvidia.com/gpu allocatable, "
                                          r"nvidia.com/gpu.product in \(NVIDIA-A100, NVIDIA-A100-SHARED\)"):
        choose_node(parse(gpu={"product": "NVIDIA-A100"}), [H100, L4])


def test_fixed_replicas_must_fit_the_sharing_slots():
    with pytest.raises(InvalidSpec, match=r"spec.replicas \(6\) exceeds the 4 sharing slots"):
        choose_node(parse(replicas=6), [H100])


def test_dra_needs_no_device_plugin_resource():
    node = GPUNode("dra-node", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    assert choose_node(parse(placement="dra"), [node]).name == "dra-node"
