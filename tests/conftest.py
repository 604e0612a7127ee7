"""Hypothesis profiles for the property tests, chosen with ``--hypothesis-profile``.

``default`` (the test suite): 200 examples per property test, about two and a quarter minutes for
tests/test_properties.py on a 2-core machine. ``long``: 2,500 per property test (see
docs/robustness.md). Example runtimes vary from milliseconds to seconds (tracing,
solving), so there is no deadline.
"""

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
# The default profile is derandomized so the README test command is reproducible; `long` explores.
settings.register_profile("default", max_examples=200, derandomize=True, **_COMMON)
# Hypothesis loads its own "ci" profile (100 examples, other health checks) where CI is set,
# in place of "default": the same settings under that name, so CI runs what the README says.
settings.register_profile("ci", max_examples=200, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=2500, **_COMMON)
