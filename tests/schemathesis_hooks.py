"""Schemathesis hooks for tests/test_fuzz_api.py (loaded by the schemathesis CLI through SCHEMATHESIS_HOOKS).

They bound the work that accepted requests cause, so the fuzzing budget stays CI-sized: just before a request is
sent (every phase), a valid ``ms`` (0 to 60000) or ``size_bytes`` (0 to 8 MiB) is folded into a small valid value of
the same field; schemathesis re-classifies the case after the edit. Invalid values are left alone, so every
rejection path is still fuzzed; the largest valid values are posted once each by tests/test_api_hostile.py."""
import schemathesis

FOLD = {"ms": (60_000, 50), "size_bytes": (8 * 1024 * 1024, 65_536)}


def fold_expensive_values(body) -> None:
    if not isinstance(body, dict):
        return
    for key, (maximum, modulus) in FOLD.items():
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= maximum:
            body[key] = type(value)(value % modulus)


@schemathesis.hook
def before_call(_context, case, _kwargs):
    fold_expensive_values(case.body)
