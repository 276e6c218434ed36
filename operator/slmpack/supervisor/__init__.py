"""`slmpack supervise`: the pack pod's supervisor, a small app of its own that starts, watches and drains the
pod's engines (and its MPS daemon). It reads its plan from the environment (core/packpod.py), never from the
Kubernetes API."""
