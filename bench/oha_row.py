#!/usr/bin/env python3
"""One Markdown table row from an oha JSON report: oha_row.py REPORT.json LABEL... -> | LABEL... | req/s | p50 | p99 | errors |"""
import json
import sys

d = json.load(open(sys.argv[1]))
s, p = d["summary"], d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
# oha cancels the requests still in flight when the duration ends: not errors of the server.
errors = sum(v for k, v in codes.items() if k != "200") + sum(v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
cells = " | ".join(sys.argv[2:])
print(f"| {cells} | {s['requestsPerSec']:.1f} | {(p['p50'] or 0) * 1000:.1f} | {(p['p99'] or 0) * 1000:.1f} | {errors} |")
