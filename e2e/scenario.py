"""The whole slmpack flow on a real cluster: the local test bed by default, any cluster with KUBECONFIG.

    python3 e2e/scenario.py [--record benchmarks/e2e.md]

helm install → a bad SLMDeployment rejected at apply → kubectl apply the CPU example → the
operator's profiling Job (the operator pod is killed meanwhile and must not start a second Job)
→ the real profiler writes the SLMProfile → the StatefulSet's CPU replicas start together → a
completion through the Service → Prometheus on the host evaluates J/token → kubectl delete
removes everything → helm uninstall leaves no operator object. Prints a timeline of the phases.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from slmpack.api.models import SLMProfileStatus  # noqa: E402
from slmpack.profiler.report import plot, table  # noqa: E402

CACHE = Path(os.environ.get("SLMPACK_CACHE") or Path.home() / ".cache" / "slmpack")
KUBECTL = str(CACHE / "k8s-1.20.2/bin/kubectl") if (CACHE / "k8s-1.20.2/bin/kubectl").exists() else "kubectl"
HELM = str(CACHE / "helm-3.17/helm")
LOCAL = not os.environ.get("KUBECONFIG")
KUBECONFIG = os.environ.get("KUBECONFIG") or str(ROOT / ".cluster" / "kubeconfig")
SYSTEM_NS, APP_NS, NAME = "slmpack-system", "demo", "smollm2-cpu"
OUT = ROOT / "out"


class Timeline:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.rows: list[tuple[str, float, float]] = []

    @contextmanager
    def phase(self, name: str):
        began = time.monotonic()
        print(f"--> {name}", flush=True)
        yield
        self.rows.append((name, began - self.start, time.monotonic() - began))
        print(f"    done in {time.monotonic() - began:.1f} s", flush=True)

    def render(self) -> str:
        lines = ["| phase | starts at (s) | duration (s) |", "|---|---:|---:|"]
        lines += [f"| {name} | {at:.0f} | {took:.1f} |" for name, at, took in self.rows]
        lines.append(f"| **total** | | **{time.monotonic() - self.start:.0f}** |")
        return "\n".join(lines)


def sh(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, input=input,
                          env={**os.environ, "KUBECONFIG": KUBECONFIG})
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done


def kubectl(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return sh(KUBECTL, *args, check=check, input=input)


def get(kind: str, name: str = "", namespace: str = APP_NS, selector: str = "") -> dict | None:
    args = ["get", kind, "-o", "json", "-n", namespace]
    args += [name] if name else []
    args += ["-l", selector] if selector else []
    done = kubectl(*args, check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def wait(predicate, seconds: float, what: str, every: float = 2.0, show=None):
    started = time.monotonic()
    deadline = started + seconds
    last_shown = None
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        if show and (message := show()) != last_shown:
            # The seconds into the step, so that the record shows where a long step spends its time.
            print(f"    {time.monotonic() - started:6.1f} s  {message}", flush=True)
            last_shown = message
        time.sleep(every)
    raise SystemExit(f"timed out after {seconds:.0f} s waiting for {what}")


def status(kind: str, name: str) -> dict:
    return (get(kind, name) or {}).get("status") or {}


def items(kind: str, namespace: str = APP_NS, selector: str = "") -> list[dict]:
    return (get(kind, namespace=namespace, selector=selector) or {}).get("items", [])


# ---------------------------------------------------------------- steps


def set_up_local_cluster() -> None:
    for target in ("cluster-up", "fake-gpu", "images-import"):
        done = subprocess.run(["make", "-s", target], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"make {target} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def helm_install() -> None:
    sh(HELM, "upgrade", "--install", "slmpack", str(ROOT / "charts/slmpack"), "--namespace", SYSTEM_NS,
       "--create-namespace", "--wait", "--timeout", "5m", "--set", "devMode.cpu=true",
       "--set", f"devMode.fakeDeployment={APP_NS}/{NAME}",
       "--set", "exporter.runtimeClassName=")
    # A namespace left from an earlier run may still be terminating: let it go, then start fresh.
    wait(lambda: (get("namespace", APP_NS, namespace="default") or {}).get("status", {}).get("phase") != "Terminating",
         300, f"namespace {APP_NS} from an earlier run to finish terminating")
    kubectl("create", "namespace", APP_NS, check=False)


def bad_spec_is_rejected() -> None:
    bad = {"apiVersion": "slmpack.dev/v1alpha1", "kind": "SLMDeployment", "metadata": {"name": "bad"},
           "spec": {"model": {"name": "x"}, "sharing": "mig"}}
    done = kubectl("apply", "-n", APP_NS, "-f", "-", check=False, input=json.dumps(bad))
    assert done.returncode != 0 and "spec.sharing" in done.stderr, done.stderr
    print(f"    rejected: {done.stderr.strip().splitlines()[-1][:160]}")


def profiling_started() -> str:
    kubectl("apply", "-n", APP_NS, "-f", str(ROOT / "examples/slmdeployment-cpu.yaml"))
    jobs = wait(lambda: items("jobs"), 120, "the profiling Job")
    return jobs[0]["metadata"]["name"]


def operator_killed_during_profiling(job: str) -> None:
    selector = "app.kubernetes.io/component=operator"
    old = {p["metadata"]["name"] for p in items("pods", SYSTEM_NS, selector)}
    kubectl("delete", "pod", "-n", SYSTEM_NS, "-l", selector, "--wait=true")
    wait(lambda: any(p["metadata"]["name"] not in old and all(c.get("ready") for c in
                                                                  p["status"].get("containerStatuses", [{}]))
                     for p in items("pods", SYSTEM_NS, selector)), 180, "a new operator pod")
    time.sleep(15)  # several reconciles of the new operator
    jobs = [j["metadata"]["name"] for j in items("jobs")]
    assert jobs == [job], f"expected only {job}, found {jobs}"
    print(f"    a new operator took over; still one Job: {job}")


def profile_measured() -> str:
    profile = wait(lambda: status("slmd", NAME).get("profile"), 60, "the profile name")

    def progress():
        s = status("slmp", profile)
        return f"{s.get('profilingPhase', 'Waiting')}: {s.get('message', '')}"

    wait(lambda: status("slmp", profile).get("phase") in ("Ready", "Failed"), 1800, "the profile", 5, progress)
    measured = status("slmp", profile)
    if measured.get("phase") != "Ready":
        raise SystemExit(f"profiling failed: {measured.get('message')}")
    return profile


def replicas_ready() -> dict:
    sts = wait(lambda: get("statefulset", NAME), 180, "the StatefulSet")
    planned = sts["spec"]["replicas"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"  # CPU: as the profiler started them

    def show():
        now = status("slmd", NAME)
        return f"{now.get('readyReplicas', 0)}/{planned} ready, phase {now.get('phase')}"

    wait(lambda: status("slmd", NAME).get("phase") == "Ready", 1500, "the replicas", 5, show)
    pods = sorted(items("pods", selector=f"slmpack.dev/deployment={NAME}"), key=lambda p: p["metadata"]["name"])
    for earlier, later in zip(pods, pods[1:], strict=False):
        ready_at = next(c["lastTransitionTime"] for c in earlier["status"]["conditions"] if c["type"] == "Ready")
        assert later["metadata"]["creationTimestamp"] <= ready_at, "CPU replicas must start together"
    return status("slmd", NAME)


def completion_through_the_service() -> str:
    # Routing is on by default: the Service's name and port stay, and it selects the routers once one is ready.
    service = wait(lambda: (s := get("service", NAME))["spec"]["selector"].get("app.kubernetes.io/name")
                   == "slmpack-router" and s, 120, "the Service to select the routers")
    routers = get("deployment", f"{NAME}-router")
    ready = routers["status"].get("readyReplicas", 0)
    print(f"    through the routers: {ready} of {routers['spec']['replicas']} ready")
    url = f"http://{service['spec']['clusterIP']}:8000/v1/completions"
    body = {"model": NAME, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    answer = httpx.post(url, json=body, timeout=120).json()["choices"][0]["text"]
    assert answer.strip(), "the completion came back empty"
    print(f"    {body['prompt']!r} -> {answer!r}")
    return answer


DEMO_LEFT = ROOT / ".cluster" / "demo-left"  # what a kept demo left running, for `make demo-down`


def prometheus_energy_per_token(keep: bool = False) -> float:
    binary = shutil.which("prometheus")
    engines = [f"{p['status']['podIP']}:8000" for p in items("pods", selector=f"slmpack.dev/deployment={NAME}")]
    exporters = [f"{p['status']['podIP']}:9400"
                 for p in items("pods", SYSTEM_NS, "app.kubernetes.io/component=exporter")]
    pods = {p["status"]["podIP"]: p["metadata"]["name"]
            for p in items("pods", selector=f"slmpack.dev/deployment={NAME}")}
    config = {"global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
              "rule_files": [str(ROOT / "deploy/prometheus/slmpack-rules.yaml")],
              "scrape_configs": [
                  {"job_name": "slmpack-exporter", "static_configs": [{"targets": exporters}]},
                  {"job_name": "slmpack-engine", "static_configs": [
                      {"targets": [t], "labels": {"namespace": APP_NS, "pod": pods[t.split(":")[0]],
                                                  "slmdeployment": NAME}} for t in engines]}]}
    work = Path(tempfile.mkdtemp(prefix="slmpack-prometheus-"))
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                                f"--storage.tsdb.path={work / 'data'}", "--web.listen-address=127.0.0.1:19090"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=keep)
    try:
        service = get("service", NAME)["spec"]["clusterIP"]
        url = "http://127.0.0.1:19090/api/v1/query"

        def joules():
            httpx.post(f"http://{service}:8000/v1/completions", timeout=120,
                       json={"model": NAME, "prompt": "Energy per token", "max_tokens": 16})
            try:
                result = httpx.get(url, params={"query": "slmpack:energy_per_token:joules"}, timeout=5).json()
            except httpx.HTTPError:
                return None
            return result["data"]["result"] if result.get("status") == "success" else None

        found = wait(joules, 180, "slmpack:energy_per_token:joules", 2)
        value = float(found[0]["value"][1])
        print(f"    J/token for {APP_NS}/{NAME}: {value:.4f} (fake GPU power in CPU dev mode)")
        if keep:  # left for the newcomer to query; `make demo-down` stops it by this PID
            DEMO_LEFT.write_text(json.dumps({"prometheus_pid": process.pid, "prometheus_dir": str(work)}))
        return value
    finally:
        if not keep:
            process.terminate()
            process.wait(10)
            shutil.rmtree(work, ignore_errors=True)


def try_it() -> str:
    """What a newcomer can do with the demo left running."""
    service = get("service", NAME)["spec"]["clusterIP"]
    kube = f"KUBECONFIG={KUBECONFIG} {CACHE / 'k8s-1.20.2/bin/kubectl'}"
    return f"""
The deployment is left serving. Try it:

  curl http://{service}:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{NAME}", "prompt": "The capital of France is", "max_tokens": 16}}'
  python3 -c "from openai import OpenAI; c = OpenAI(base_url='http://{service}:8000/v1', api_key='none'); \\
print(c.completions.create(model='{NAME}', prompt='Small models', max_tokens=16).choices[0].text)"

  {kube} get slmd,slmp -n {APP_NS}
  {kube} describe slmd {NAME} -n {APP_NS}

  Prometheus: http://127.0.0.1:19090/graph?g0.expr=slmpack:energy_per_token:joules   (J/token per deployment)

When done: make demo-down   (removes the deployment, the chart, Prometheus and the cluster)
"""


def plot_profile(profile: str) -> Path:
    raw = status("slmp", profile)
    measured = SLMProfileStatus.from_stored(raw)
    OUT.mkdir(exist_ok=True)
    (OUT / "profile.json").write_text(json.dumps(raw, indent=1))
    paths = plot(measured, OUT, title=f"{NAME}: SmolLM2-135M on vLLM CPU")
    print(table(measured))
    return paths[0]


def deletion_cleans_up(profile: str) -> None:
    kubectl("delete", "slmd", NAME, "-n", APP_NS, "--wait=true")
    wait(lambda: not get("statefulset", NAME) and not get("service", NAME) and not get("slmp", profile)
         and not items("jobs") and not items("pods", selector=f"slmpack.dev/deployment={NAME}"),
         180, "garbage collection of everything the deployment made")


def helm_uninstall() -> None:
    sh(HELM, "uninstall", "slmpack", "--namespace", SYSTEM_NS, "--wait", "--timeout", "3m")
    wait(lambda: not items("all", SYSTEM_NS, "app.kubernetes.io/name=slmpack"), 120, "the operator objects to go")
    left = kubectl("get", "clusterroles,clusterrolebindings", "-l", "app.kubernetes.io/name=slmpack",
                   "-o", "name").stdout.strip()
    assert not left, f"left behind: {left}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, help="write the timeline as Markdown to this file")
    parser.add_argument("--keep", action="store_true",
                        help="leave the deployment serving and Prometheus running to try (make demo); "
                             "`make demo-down` removes them")
    args = parser.parse_args()
    timeline = Timeline()
    if LOCAL:
        with timeline.phase("local cluster up, fake GPU, images imported"):
            set_up_local_cluster()
    with timeline.phase("helm install"):
        helm_install()
    with timeline.phase("bad SLMDeployment rejected at apply"):
        bad_spec_is_rejected()
    with timeline.phase("apply the CPU example until the profiling Job starts"):
        job = profiling_started()
    with timeline.phase("operator pod killed during profiling, recovered, no second Job"):
        operator_killed_during_profiling(job)
    with timeline.phase("profiling: real profiler on vLLM CPU writes the SLMProfile"):
        profile = profile_measured()
    with timeline.phase("StatefulSet replicas start together and become Ready"):
        final = replicas_ready()
    with timeline.phase("completion through the Service"):
        completion_through_the_service()
    with timeline.phase("Prometheus on the host evaluates J/token"):
        joules = prometheus_energy_per_token(keep=args.keep)
    with timeline.phase("plot the profile"):
        png = plot_profile(profile)
    if not args.keep:
        with timeline.phase("kubectl delete removes everything it created"):
            deletion_cleans_up(profile)
        with timeline.phase("helm uninstall leaves no operator objects"):
            helm_uninstall()
    plan = final.get("plan", {})
    print(f"\nReady with {plan.get('replicas')} replica(s) at knee batch {plan.get('kneeBatchSize')}; "
          f"plot: {png}; J/token: {joules:.4f}\n")
    print(timeline.render())
    if args.keep:
        print(try_it())
    if args.record:
        args.record.write_text("# End-to-end timeline\n\nOn the local test bed (2 cores, no GPU), "
                               "`python3 e2e/scenario.py --record benchmarks/e2e.md`:\n\n"
                               + timeline.render() + "\n\n" + f"Plan: `{json.dumps(plan)}`\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
