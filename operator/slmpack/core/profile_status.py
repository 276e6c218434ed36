"""An SLMProfile's conditions and the phase derived from them, and its progress estimate (pure).

Every message is non-empty: the Kubernetes client sends an empty string as null, which the
CRD's schema (message: string) rejects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from slmpack.api.models import Condition, ProfileProgress
from slmpack.core.conditions import get_condition, set_condition

READY = "Ready"
FAILED = "Failed"
# An extension for another SLO that failed: the profile stays Ready for what it has.
EXTENDED = "Extended"


def measured(conditions: list[Condition], message: str, now: datetime, generation: int | None = None):
    conditions = set_condition(conditions, READY, True, "Measured", message, now, generation)
    return set_condition(conditions, FAILED, False, "Measured", "the profile was measured", now, generation)


def failed(conditions: list[Condition], reason: str, message: str, now: datetime, generation: int | None = None):
    conditions = set_condition(conditions, READY, False, reason, message, now, generation)
    return set_condition(conditions, FAILED, True, reason, message, now, generation)


def in_progress(conditions: list[Condition], message: str, now: datetime, generation: int | None = None):
    conditions = set_condition(conditions, READY, False, "Profiling", message, now, generation)
    return set_condition(conditions, FAILED, False, "Profiling", "the profiler is measuring", now, generation)


def extending(conditions: list[Condition], message: str, now: datetime, generation: int | None = None):
    """A Ready profile that gains probes for another SLO stays Ready: its deployments keep what they use."""
    conditions = set_condition(conditions, READY, True, "Extending", message, now, generation)
    return set_condition(conditions, FAILED, False, "Extending", "the profiler is adding probes", now, generation)


def extension_result(conditions: list[Condition], ok: bool, message: str, now: datetime):
    conditions = set_condition(conditions, READY, True, "Measured", "the profile was measured", now)
    return set_condition(conditions, EXTENDED, ok, "Extended" if ok else "ExtensionFailed", message, now)


def extension_failed(conditions: list[Condition]) -> bool:
    extended = get_condition(conditions, EXTENDED)
    return extended is not None and extended.status == "False"


def derive_phase(conditions: list[Condition]) -> str:
    """Pending, Profiling, Ready or Failed: a one-word summary of the conditions."""
    failure, ready = get_condition(conditions, FAILED), get_condition(conditions, READY)
    if failure is not None and failure.status == "True":
        return "Failed"
    if ready is not None and ready.status == "True":
        return "Ready"
    return "Profiling" if ready is not None else "Pending"


def progress(done: int, planned: int, probe_seconds: Sequence[float], starts_left: int = 0,
             start_seconds: float | None = None) -> ProfileProgress:
    """Probes done and planned, and the time left: the mean probe time so far times the probes left,
    plus the engine starts still to come at the last start's cost."""
    planned = max(planned, done)
    eta = None
    if probe_seconds:
        eta = sum(probe_seconds) / len(probe_seconds) * (planned - done) + starts_left * (start_seconds or 0)
        eta = math.ceil(eta)
    return ProfileProgress(probes_done=done, probes_planned=planned, eta_seconds=eta)


def planned_sweep_probes(grid_size: int, measured_count: int, adaptive: bool, finished: bool) -> int:
    """Sweep probes expected in all. A full sweep probes the grid; an adaptive one, when not finished,
    about log2 of the unprobed grid points more (it bisects)."""
    if finished:
        return measured_count
    if not adaptive:
        return grid_size
    open_points = max(grid_size - measured_count, 1)
    return measured_count + max(1, math.ceil(math.log2(open_points + 1)))
