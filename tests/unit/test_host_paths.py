"""Host paths: a deployment mounts only the node directories the cluster admin allows, and each namespace
writes only its own part of the node's engine cache."""

from pathlib import Path

import pytest
import yaml

from slmpack.cli import main
from slmpack.core.decide import ClusterSnapshot, decide
from slmpack.core.validation import HostPathPolicy, host_path_problems, parse_spec
from tests.unit.test_decide import H100, NOW, condition, deployment

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / "tests" / "data" / "nodes" / "h100-mps-r4-g1.yaml"
CACHE = "/var/lib/slmpack/engine-cache"
ADMIN = HostPathPolicy(model_prefixes=("/data/models",), engine_cache=CACHE)


def model_on(host_path: str) -> dict:
    return {"name": "/models/m", "volume": {"hostPath": host_path}}


def problems(policy: HostPathPolicy, **spec) -> list[str]:
    return host_path_problems(parse_spec({"model": {"name": "m"}, **spec}), policy)


@pytest.mark.parametrize("host_path", ["/data/models", "/data/models/smollm2", "/data/models/", "//data//models/a"])
def test_a_model_under_an_allowed_prefix_is_mounted(host_path):
    assert problems(ADMIN, model=model_on(host_path)) == []


@pytest.mark.parametrize("host_path", [
    "/data/models-evil",               # a sibling whose name merely starts like the prefix
    "/data",                           # above the prefix
    "/etc",
    "/data/models/../../etc",          # the node resolves .. after symlinks: refused whatever it names
    "/data/models/./smollm2",
])
def test_a_model_elsewhere_is_refused_naming_the_field_the_path_and_the_fix(host_path):
    (problem,) = problems(ADMIN, model=model_on(host_path))
    assert problem.startswith(f"spec.model.volume.hostPath ({host_path})")
    assert "hostPaths.modelPrefixes" in problem or "without them" in problem


def test_nothing_is_allowed_by_default():
    (problem,) = problems(HostPathPolicy(), model=model_on("/data/models/m"))
    assert "allows for models (none)" in problem and "persistentVolumeClaim" in problem
    (problem,) = problems(HostPathPolicy(), engine={"cache": {"hostPath": CACHE}})
    assert problem.startswith(f"spec.engine.cache.hostPath ({CACHE})") and "exporter.engineCacheHostPath" in problem
    assert problems(HostPathPolicy(), model={"name": "/models/m", "volume": {"persistentVolumeClaim": "models"}},
                    engine={"cache": {"persistentVolumeClaim": "cache"}}) == []


def test_the_engine_cache_is_the_admins_directory_exactly():
    assert problems(ADMIN, engine={"cache": {"hostPath": CACHE}}) == []
    assert problems(ADMIN, engine={"cache": {"hostPath": CACHE + "/"}}) == []
    # Below it lie the namespaces' own directories: a cache there would write into another tenant's.
    for other in (CACHE + "/team-b", "/data/models", "/var/lib/slmpack"):
        (problem,) = problems(ADMIN, engine={"cache": {"hostPath": other}})
        assert problem.startswith(f"spec.engine.cache.hostPath ({other}) is not the node engine cache")
        assert CACHE in problem


@pytest.mark.parametrize("prefixes, cache, message", [
    (("data/models",), None, "must be absolute"),
    (("/data/../etc",), None, "without . or .."),
    (("/var/lib/slmpack",), CACHE, "overlaps the engine cache"),
    ((CACHE + "/team-a",), CACHE, "overlaps the engine cache"),
])
def test_the_admins_settings_are_checked_when_the_operator_starts(prefixes, cache, message):
    with pytest.raises(ValueError, match=message):
        HostPathPolicy(prefixes, cache)


def test_the_settings_read_like_path():
    assert HostPathPolicy.from_settings("/data/models:/srv/weights", "") == HostPathPolicy(
        ("/data/models", "/srv/weights"), None)
    assert HostPathPolicy.from_settings("", "") == HostPathPolicy()


def test_a_refused_host_path_is_an_invalid_spec_with_a_warning_event():
    body = deployment(model=model_on("/srv/models"))
    decision = decide(body, ClusterSnapshot((H100,)), NOW, host_paths=ADMIN)
    refused = condition(decision, "InvalidSpec")
    assert refused.status == "True" and refused.message.startswith("spec.model.volume.hostPath (/srv/models)")
    assert decision.create == decision.apply == []
    assert [(e.reason, e.warning) for e in decision.events] == [("InvalidSpec", True)]
    allowed = decide(deployment(model=model_on("/data/models/m")), ClusterSnapshot((H100,)), NOW, host_paths=ADMIN)
    assert condition(allowed, "InvalidSpec").status == "False"


def render(capsys, tmp_path, spec: dict, *options: str) -> tuple[int, list[dict], str]:
    body = yaml.safe_load((ROOT / "examples" / "slmdeployment.yaml").read_text())
    body["spec"].update(spec)
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(body))
    code = main(["render", "-f", str(path), "--node", str(NODE), "-n", "team-a", *options])
    out, err = capsys.readouterr()
    return code, [d for d in yaml.safe_load_all(out) if d], err


def test_render_refuses_host_paths_unless_given_the_admins_allow_list(capsys, tmp_path):
    spec = {"model": model_on("/data/models/m"), "engine": {"cache": {"hostPath": CACHE}}}
    code, docs, err = render(capsys, tmp_path, spec)
    assert code == 1 and docs == []
    assert "spec.model.volume.hostPath (/data/models/m)" in err and "spec.engine.cache.hostPath" in err
    code, docs, err = render(capsys, tmp_path, spec, "--model-host-path-prefix", "/data/models",
                             "--engine-cache-host-path", CACHE)
    assert code == 0, err
    job = next(d for d in docs if d["kind"] == "Job")["spec"]["template"]["spec"]
    cache = next(m for m in job["containers"][0]["volumeMounts"] if m["name"] == "engine-cache")
    assert cache["subPath"] == "team-a"  # the namespace's own directory of the node's cache
    model = next(v for v in job["volumes"] if v["name"] == "model")
    assert model["hostPath"]["path"] == "/data/models/m"


def test_render_refuses_a_bad_allow_list(capsys, tmp_path):
    code, _, err = render(capsys, tmp_path, {}, "--model-host-path-prefix", "models")
    assert code == 2 and "must be absolute" in err
