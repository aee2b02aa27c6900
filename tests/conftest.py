"""Shared test settings.

- float32 matmuls at full precision on accelerators (GPUs default to TF32, which
  cannot meet the rtol 1e-5 checks against the float64 reference);
- hypothesis profiles: "ci" (default: few examples, no deadline: compilation is slow)
  and "thorough" (HYPOTHESIS_PROFILE=thorough);
- on a CPU, XLA without most of its optimisation passes (``jax_disable_most_optimizations``)
  in this process: compiling dominates most tests' time (about a third less with the
  passes off), and nothing they check (tracing, autodiff, batching, dtypes, values
  against float64 references) depends on them.  Tests whose time is spent running
  compiled programs (training runs) or that inspect the compiled program (memory) are
  marked ``xla_optimized`` (a test or a whole module); subprocesses the suite starts
  compile normally.  ``JATTN_TEST_XLA_OPTIMIZE=1`` optimises everything (a GPU always).
- one persistent compilation cache per test session (a fresh temporary folder, removed
  at the end), shared by the xdist workers and every subprocess the tests start
  (``JAX_COMPILATION_CACHE_DIR`` in their environment): the training, resume, launcher
  and 8-device tests compile the same programs in several processes, and a program
  that took over a second to compile is compiled once (JAX's default threshold).  A
  session given ``JAX_COMPILATION_CACHE_DIR`` uses that folder and keeps it.
"""

import os
import shutil
import tempfile

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CHEAP_COMPILES = jax.default_backend() == "cpu" and os.environ.get("JATTN_TEST_XLA_OPTIMIZE") != "1"


def _optimise_while(optimised: bool):
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", CHEAP_COMPILES and not optimised)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(autouse=True, scope="module")
def _xla_optimisation_of_the_module(request):
    """Cheap compiles unless the module is marked ``xla_optimized`` (set before its
    module-scoped fixtures run)."""
    yield from _optimise_while(request.node.get_closest_marker("xla_optimized") is not None)


@pytest.fixture(autouse=True)
def _xla_optimisation_of_the_test(request):
    yield from _optimise_while(request.node.get_closest_marker("xla_optimized") is not None)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped, with the reason shown, when JAX sees no GPU."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (JAX default backend is %s)" % jax.default_backend())
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not a name containing "gpu"
            item.add_marker(skip)


_SESSION_CACHE = "JATTN_TEST_SESSION_CACHE"  # set when this session made the cache folder


def pytest_configure(config):
    """The session's compilation cache: made by the first pytest process (xdist's
    controller, before it starts the workers, which inherit the environment)."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jattn-test-compile-cache-")
        os.environ[_SESSION_CACHE] = str(os.getpid())
    # jax read its environment when conftest imported it: tell this process too.
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
    if os.environ.get(_SESSION_CACHE) == str(os.getpid()):
        shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), ignore_errors=True)
