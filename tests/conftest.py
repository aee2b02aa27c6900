"""Shared test settings.

- float32 matmuls at full precision on accelerators (GPUs default to TF32, which
  cannot meet the rtol 1e-5 checks against the float64 reference);
- hypothesis profiles: "ci" (default: few examples, no deadline: compilation is slow)
  and "thorough" (HYPOTHESIS_PROFILE=thorough).
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped, with the reason shown, when JAX sees no GPU."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (JAX default backend is %s)" % jax.default_backend())
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a name containing "gpu"
            item.add_marker(skip)
