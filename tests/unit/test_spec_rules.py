"""The CRD's CEL rules and the operator's own checks refuse the same specs.

Apiservers from 1.25 refuse a bad spec at `kubectl apply` by the CEL rules; older ones ignore
them, and then the operator's InvalidSpec condition must say the same. The rules are evaluated
here with cel-python on the spec as the apiserver defaults it.
"""

import celpy
import pytest

from slmpack.api.crds import all_crds
from slmpack.api.models import SLMDeploymentSpec
from slmpack.core.validation import InvalidSpec, parse_spec, spec_problems

SPEC_SCHEMA = all_crds()[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def broken_cel_rules(schema: dict, value, path: str = "spec") -> list[str]:
    """The messages of the CEL rules `value` breaks, walking the schema as the apiserver does."""
    env = celpy.Environment()
    broken = [f"{path}: {rule['message']}" for rule in schema.get("x-kubernetes-validations", [])
              if not env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})]
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                broken += broken_cel_rules(sub, value[name], f"{path}.{name}")
    if isinstance(value, list) and "items" in schema:
        for item in value:
            broken += broken_cel_rules(schema["items"], item, path)
    return broken


def operator_problems(raw: dict) -> list[str]:
    try:
        return spec_problems(parse_spec(raw))
    except InvalidSpec as error:
        return [str(error)]


def spec(**fields) -> dict:
    return {"model": {"name": "/models/SmolLM2-135M-Instruct"}, **fields}


CROSS_FIELD = [
    (spec(profiling={"minBatchSize": 64, "maxBatchSize": 8}), "minBatchSize"),
    (spec(model={"name": "/models/m", "volume": {"hostPath": "/srv/m", "persistentVolumeClaim": "m"}}),
     "exactly one of hostPath or persistentVolumeClaim"),
    (spec(model={"name": "/models/m", "volume": {}}), "exactly one of hostPath or persistentVolumeClaim"),
    (spec(model={"name": "/data/m", "volume": {"hostPath": "/srv/m"}}), "spec.model.name must be a path under"),
    (spec(model={"name": "m", "maxModelLen": 128}), "spec.profiling.workload needs"),
    (spec(placement="dra", gpu={"resourceName": "nvidia.com/gpu.shared"}), "spec.gpu.resourceName"),
    (spec(engine={"env": [{"name": "T", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}),
     "takes value or valueFrom, not both"),
    (spec(engine={"env": [{"name": "T", "valueFrom": {}}]}), "valueFrom needs exactly one of"),
    (spec(engine={"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"},
                                                      "fieldRef": {"fieldPath": "metadata.name"}}}]}),
     "valueFrom needs exactly one of"),
]


@pytest.mark.parametrize("raw, message", CROSS_FIELD, ids=[m for _, m in CROSS_FIELD])
def test_cel_and_the_operator_refuse_the_same_spec(raw, message):
    defaulted = SLMDeploymentSpec.model_validate(raw).to_wire()
    assert any(message in m for m in broken_cel_rules(SPEC_SCHEMA, defaulted)), "refused at apply (1.25+)"
    assert any(message in m for m in operator_problems(raw)), "refused by the operator (any apiserver)"


def test_a_good_spec_passes_both():
    for raw in (spec(), spec(model={"name": "/models/m", "volume": {"hostPath": "/srv/m"}}),
                spec(placement="dra"), spec(profiling={"minBatchSize": 8, "maxBatchSize": 8})):
        assert broken_cel_rules(SPEC_SCHEMA, SLMDeploymentSpec.model_validate(raw).to_wire()) == []
        assert operator_problems(raw) == []


FORMATS = [
    (spec(gpu={"nodeSelector": {"bad key!": "x"}}), "spec.gpu.nodeSelector"),
    (spec(gpu={"nodeSelector": {"zone": "not a label value"}}), "spec.gpu.nodeSelector"),
    (spec(resources={"limits": {"memory": "lots"}}), "spec.resources.limits"),
    (spec(engine={"env": [{"name": "1 X", "value": "y"}]}), "spec.engine.env"),
    (spec(profiling={"profileRef": "Not_A_Name"}), "spec.profiling.profileRef"),
    (spec(model={"name": "/models/m", "volume": {"hostPath": "relative/dir"}}), "spec.model.volume.hostPath"),
]


@pytest.mark.parametrize("raw, field", FORMATS, ids=[f for _, f in FORMATS])
def test_values_kubernetes_would_refuse_on_a_child_are_refused_on_the_spec(raw, field):
    problems = operator_problems(raw)
    assert any(field in p for p in problems), problems
