"""Test setup: CPU JAX with 8 fake devices (for sharding tests), float32, hypothesis profiles.

Caches are per test session: GGUF files are converted once into a temporary model cache (the first SmolLM2 load
converts, later loads read it), and the CLI's persistent compilation cache is off unless a test turns it on.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

if "APPO_MODEL_CACHE" not in os.environ:
    _model_cache = tempfile.mkdtemp(prefix="appo-test-models-")
    atexit.register(shutil.rmtree, _model_cache, True)
    os.environ["APPO_MODEL_CACHE"] = _model_cache
os.environ.setdefault("APPO_JAX_COMPILE_CACHE", "off")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "default"))
