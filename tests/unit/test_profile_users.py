"""Which deployments a profile's or profiling Job's event wakes."""

import asyncio

from slmpack.controller.handlers import Controller, deployments_by_profile


def test_a_profile_wakes_its_users_and_the_deployments_that_have_not_recorded_theirs_yet():
    async def woken():
        index = {}
        for namespace, name, status in [("ns", "user", {"profile": "p"}), ("ns", "new", {}),
                                        ("ns", "other", {"profile": "q"}), ("elsewhere", "new", {})]:
            for key, value in (await deployments_by_profile(namespace=namespace, name=name, status=status)).items():
                index.setdefault(key, []).append(value)
        controller = Controller(kube=None, indices={"deployments_by_profile": index})
        # The reconcile that created profile p has not yet written "new"'s status when p turns Ready.
        controller.queue_profile_users("ns", "p")
        return {await controller.queue.get() for _ in range(len(controller.queue))}

    assert asyncio.run(woken()) == {("ns", "user"), ("ns", "new")}
