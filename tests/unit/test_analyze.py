"""`slmpack analyze` on `vllm bench serve` result files."""

import json
import subprocess
import sys

import pytest

from slmpack.profiler.bench_results import BenchResultError, load_points

from .curves import load_curve


def bench_result(point, **extra) -> dict:
    """A `vllm bench serve` result as it writes it, from a recorded point."""
    return {"backend": "vllm", "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "duration": 12.5,
            "completed": point.completed, "failed": 0, "request_throughput": point.request_throughput_per_s,
            "output_throughput": point.output_throughput_tokens_per_s,
            "total_token_throughput": point.output_throughput_tokens_per_s * 2,
            "mean_ttft_ms": point.ttft_ms.mean, "median_ttft_ms": point.ttft_ms.p50, "p99_ttft_ms": point.ttft_ms.p99,
            "mean_itl_ms": point.itl_ms.mean, "median_itl_ms": point.itl_ms.p50, "p99_itl_ms": point.itl_ms.p99,
            "mean_e2el_ms": point.e2e_latency_ms.mean, **extra}


@pytest.fixture
def results(tmp_path):
    files = []
    for i, point in enumerate(load_curve("qwen2.5-0.5b-h100")):
        path = tmp_path / f"run{i}.json"
        # Three ways to carry the batch size: max_concurrency, --metadata max_num_seqs, or FILE:B.
        if i % 3 == 0:
            path.write_text(json.dumps(bench_result(point, max_concurrency=point.batch_size)))
            files.append(str(path))
        elif i % 3 == 1:
            path.write_text(json.dumps(bench_result(point, max_concurrency=None, max_num_seqs=str(point.batch_size))))
            files.append(str(path))
        else:
            path.write_text(json.dumps(bench_result(point)))
            files.append(f"{path}:{point.batch_size}")
    return files


def analyze(*args):
    return subprocess.run([sys.executable, "-m", "slmpack.cli", "analyze", *args], capture_output=True, text=True)


def test_json_report_names_the_knee(results, tmp_path):
    done = analyze(*results, "--format", "json", "--out", str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["knee"]["batch_size"] == 96
    assert report["knee"]["rule"] == "bca(eps=20%, L=5)"
    assert report["knee"]["throughput_tokens_per_s"] > 0
    assert [p["batch_size"] for p in report["points"]][:4] == [1, 2, 4, 8]
    assert (tmp_path / "plots" / "profile.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "profile.svg").exists()


def test_table_marks_the_knee(results):
    done = analyze(*results)
    assert done.returncode == 0, done.stderr
    assert any(line.strip().startswith("96 ") and "<- knee" in line for line in done.stdout.splitlines())


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.json", "cannot be read"),
    (lambda d: (d / "bad.json").write_text("{oops") and d / "bad.json", "not JSON"),
    (lambda d: (d / "other.json").write_text('{"a": 1}') and d / "other.json", "not a `vllm bench serve` result"),
    (lambda d: (d / "nob.json").write_text('{"output_throughput": 5}') and d / "nob.json", "pass it as"),
])
def test_unreadable_or_unfit_files_name_the_cause(tmp_path, make, message):
    with pytest.raises(BenchResultError, match=message):
        load_points([str(make(tmp_path))])


def test_a_batch_size_given_twice_is_refused(results):
    done = analyze(results[0], results[0])
    assert done.returncode == 2
    assert "batch size 1 is given twice" in done.stderr


def test_files_of_different_models_are_refused(tmp_path):
    point = load_curve("qwen2.5-0.5b-h100")[0]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(bench_result(point, max_concurrency=1)))
    b.write_text(json.dumps(bench_result(point, max_concurrency=2, model_id="other")))
    with pytest.raises(BenchResultError, match="different models"):
        load_points([str(a), str(b)])
