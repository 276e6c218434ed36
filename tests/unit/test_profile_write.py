"""A profiler whose result cannot reach its SLMProfile exits non-zero, so its Job fails."""

import argparse

import pytest
import yaml

from slmpack.api.models import Knee, SLMProfileStatus
from slmpack.profiler import cli_profile


@pytest.fixture
def unreachable_api(tmp_path, monkeypatch):
    """A kubeconfig whose apiserver refuses connections: every write fails as on a dead API."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def measured(*_, **__) -> SLMProfileStatus:
    # The measurement itself is tested with the real engine elsewhere; here only the write matters.
    return SLMProfileStatus(phase="Ready", knee=Knee(batch_size=8, rule="bca"), message="measured")


def args(tmp_path, target):
    parser = argparse.ArgumentParser()
    cli_profile.configure(parser)
    return parser.parse_args(["--engine", "openai", "--base-url", "http://127.0.0.1:1", "--model", "m",
                              "--out", str(tmp_path / "out")] + (["--write-profile", target] if target else []))


def test_a_result_that_cannot_be_written_fails_the_run(tmp_path, monkeypatch, unreachable_api, capsys):
    monkeypatch.setattr("slmpack.profiler.run.profile", measured)
    monkeypatch.setattr(cli_profile.time, "sleep", lambda _: None)
    assert cli_profile.run(args(tmp_path, "team/chat-profile")) == 3
    assert "could not write the result to SLMProfile team/chat-profile" in capsys.readouterr().err


def test_without_a_profile_to_write_the_run_succeeds(tmp_path, monkeypatch):
    monkeypatch.setattr("slmpack.profiler.run.profile", measured)
    assert cli_profile.run(args(tmp_path, None)) == 0
