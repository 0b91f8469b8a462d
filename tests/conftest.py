"""Test setup: CPU JAX with 8 fake devices (for sharding tests), float32, hypothesis profiles, shared caches.

XLA's CPU backend compiles at optimisation level 0 without its expensive LLVM passes (``XLA_FLAGS``, inherited by
every subprocess): the tests' programs are tiny, compiling them is most of the suite's time and these flags cut
it by about 40%. They change how fast the machine code is and, through a different order of floating-point
operations, the last bits of some results (an SFT policy's parameter hash differs from one trained at the default
level); every test compares results computed under the same flags (subprocesses inherit them) or within
tolerances, so none depends on those bits.

Caches are per test session:
- GGUF files are converted once into a temporary model cache (the first SmolLM2 load converts, later loads read
  it);
- one persistent JAX compilation cache directory under pytest's session temp dir serves the in-process tests and
  every subprocess they start (``$APPO_JAX_COMPILE_CACHE`` for the CLI, ``$JAX_COMPILATION_CACHE_DIR`` for other
  scripts), so a program compiled once in the session is loaded, not compiled, by later processes. With
  pytest-xdist the workers share the controller's directory. The tests *of* the cache give their own
  directories explicitly;
- the CPU kernels' library (`appo_jax.kernels.build`) is built once per machine into the user's kernel cache, and
  ``$APPO_JAX_KERNEL_CACHE`` names that cache for every subprocess (a test that runs a CLI with another ``HOME``
  reuses it instead of compiling the C++ again).

The suite runs on two pytest-xdist workers (``make test``: ``-n 2 --maxschedchunk 2``); tests marked ``heavy``
(several subprocesses, a minute or more each) run first, in their marker's ``order``: xdist hands each worker two
tests at a time, so the first two go to one worker and the next two to the other, and the short tests then fill
the gaps; neither worker ends the session alone with a long test.
"""
import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
              "--xla_llvm_disable_expensive_passes=true"):
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

if "APPO_MODEL_CACHE" not in os.environ:
    _model_cache = tempfile.mkdtemp(prefix="appo-test-models-")
    atexit.register(shutil.rmtree, _model_cache, True)
    os.environ["APPO_MODEL_CACHE"] = _model_cache

from hypothesis import HealthCheck, settings  # noqa: E402

# 25 examples per property: fresh random ones in every local run (``default``), a fixed set in CI (``ci``);
# ``HYPOTHESIS_PROFILE=thorough`` searches 200 for a change to the formulas
settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """The session's compilation cache: ``<session tmp>/jax-compile-cache`` (an xdist worker's session tmp is a
    sub-directory of the controller's, so every worker uses the controller's)."""
    base = config._tmp_path_factory.getbasetemp()
    if hasattr(config, "workerinput"):
        base = base.parent
    cache = base / "jax-compile-cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["APPO_JAX_COMPILE_CACHE"] = str(cache)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    from appo_jax.compilation_cache import enable_compilation_cache
    enable_compilation_cache(cache)
    from appo_jax.kernels.build import kernel_cache_dir
    os.environ.setdefault("APPO_JAX_KERNEL_CACHE", str(kernel_cache_dir()))


def pytest_collection_modifyitems(config, items):
    """``heavy`` tests first, by their ``order`` (module doc); the order of the others is kept."""
    def key(item):
        heavy = item.get_closest_marker("heavy")
        return (0, heavy.kwargs.get("order", 0)) if heavy is not None else (1, 0)
    items.sort(key=key)
