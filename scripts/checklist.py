"""The check-and-count helper of the Python check scripts (oip_clients.py, validate_manifests.py): each check
prints `ok   <what>`, the first failure prints `FAIL: <what>` and exits 1."""

import sys

passed = 0


def check(ok, what):
    global passed
    if not ok:
        print(f"FAIL: {what}")
        sys.exit(1)
    passed += 1
    print(f"ok   {what}")
