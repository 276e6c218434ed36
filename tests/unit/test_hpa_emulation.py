"""The autoscaling benchmark's HPA baseline computes what kube-controller-manager 1.20 would write."""

from benchmarks.hpa import Hpa, PodSample, metric_replicas


def running(*values):
    return [PodSample(f"p{i}", "Running", v) for i, v in enumerate(values)]


def test_a_ratio_within_the_tolerance_keeps_the_count():
    assert metric_replicas(2, running(6.8, 6.8), target=6.4) == 2  # 1.06


def test_the_count_is_the_ratio_times_the_ready_pods_rounded_up():
    assert metric_replicas(1, running(24), target=6.4) == 4
    assert metric_replicas(4, running(1, 1, 2, 0), target=6.4) == 1


def test_on_a_scale_up_pending_pods_count_as_idle():
    pods = running(12) + [PodSample("new", "Pending", None)]
    assert metric_replicas(2, pods, target=6.4) == 2  # (12 + 0) / 2 / 6.4 = 0.94: within the tolerance
    pods = running(24) + [PodSample("new", "Pending", None)]
    assert metric_replicas(2, pods, target=6.4) == 4  # 24 / 2 / 6.4 = 1.875 -> ceil(3.75)


def test_on_a_scale_down_pods_without_metrics_count_as_on_target():
    pods = running(0, 0) + [PodSample("slow", "Running", None)]
    assert metric_replicas(3, pods, target=6.4) == 1  # (0 + 0 + 6.4) / 3 / 6.4 = 0.33 -> ceil(1.0)


def test_a_recount_that_flips_the_direction_keeps_the_count():
    pods = running(7) + [PodSample("slow", "Running", None)] * 3  # 1.09 up, then 7/4/6.4 = 0.27 down
    assert metric_replicas(4, pods, target=6.4) == 4


def test_no_metric_from_any_ready_pod_changes_nothing_and_deleted_pods_are_ignored():
    assert metric_replicas(3, [PodSample("a", "Pending", None)], target=6.4) == 3
    pods = running(12.8) + [PodSample("gone", "Running", 0, deleting=True)]
    assert metric_replicas(1, pods, target=6.4) == 2


def test_scale_in_waits_for_the_highest_recommendation_of_the_window():
    hpa = Hpa(target=6.4, min_replicas=1, max_replicas=4, downscale_window_s=120)
    assert hpa.sync(0, 1, running(24)) == 4
    assert hpa.sync(60, 4, running(1, 1, 1, 1)) == 4  # 4 was recommended 60 s ago
    assert hpa.sync(125, 4, running(1, 1, 1, 1)) == 1  # it left the window


def test_a_scale_up_is_at_most_twice_the_count_or_four_and_within_max():
    hpa = Hpa(target=1, min_replicas=1, max_replicas=20, downscale_window_s=0)
    assert hpa.sync(0, 1, running(100)) == 4
    assert hpa.sync(1, 4, running(100, 100, 100, 100)) == 8
    assert Hpa(target=1, min_replicas=1, max_replicas=3).sync(0, 1, running(100)) == 3
