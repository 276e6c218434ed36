"""Shared fixtures live in tests/fixtures/, one module per real component."""

pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.engine",
    "tests.fixtures.fake_engine",
    "tests.fixtures.gpu_node",
]
