#!/usr/bin/env python3
"""Every alert rule and dashboard query against a Prometheus scraping the running system.

  check_queries.py <prometheus URL> <expected rules> <dashboard.json>... [--timeout S]

Passes when, within the timeout:
- Prometheus has loaded the expected number of rules, none unhealthy;
- every series selector in a rule's expression or a panel's query returns series (a misspelt
  metric or label name, or a label value the services never export, returns none);
- every rule's expression evaluates without error (it may return nothing: an alert that is
  not firing), and every panel's query returns series.
Before that it checks itself: a misspelt metric and a label value nobody exports must be
reported missing (the control).
"""

import json
import re
import sys
import time
import urllib.parse
import urllib.request

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}
# Modifier clauses whose parentheses hold label names, not selectors.
LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A metric name and its optional matchers (strings may contain braces).
SELECTOR = re.compile(r'([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})?')
RANGE = re.compile(r"\[[^\]]*\]")


def selectors(expr):
    """The vector selectors of a PromQL expression: `name{matchers}` or `name`."""
    text = RANGE.sub("", LABEL_LISTS.sub("", expr))
    found = []
    for m in SELECTOR.finditer(text):
        name, matchers = m.group(1), m.group(2) or ""
        rest = text[m.end():].lstrip()
        before = text[: m.start()].rstrip()
        if name in KEYWORDS or (not matchers and rest.startswith("(")):
            continue  # a keyword, or a function or aggregation
        if before.endswith('"') or before[-1:].isdigit():
            continue
        found.append(name + matchers)
    return list(dict.fromkeys(found))


def api(base, path, **params):
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def query(base, expr):
    """(error or None, number of series)."""
    try:
        data = api(base, "query", query=expr)
    except Exception as e:  # noqa: BLE001 - any failure is reported with the expression
        return str(e), 0
    result = data["result"]
    return None, len(result) if isinstance(result, list) else 1


def problems(base, rules, panels):
    out = []
    for kind, expr, must_return in [("rule", e, False) for e in rules] + [("panel", e, True) for e in panels]:
        error, n = query(base, expr)
        if error:
            out.append(f"{kind} {expr!r}: {error}")
            continue
        if must_return and n == 0:
            out.append(f"{kind} {expr!r}: no series")
        for sel in selectors(expr):
            error, n = query(base, sel)
            if error or n == 0:
                out.append(f"{kind} {expr!r}: selector {sel} returns {error or 'no series'}")
    return out


def main():
    args = sys.argv[1:]
    timeout = 120.0
    if "--timeout" in args:
        i = args.index("--timeout")
        timeout = float(args[i + 1])
        del args[i : i + 2]
    base, expected_rules, dashboards = args[0].rstrip("/"), int(args[1]), args[2:]

    assert selectors('sum by (le) (rate(a_bucket{x="}"}[5m])) > bool 0.5') == ['a_bucket{x="}"}'], "selector parsing"
    assert selectors('absent(up{job="relay"} == 1) and max(b) > 1e6') == ['up{job="relay"}', "b"], "selector parsing"

    panels = []
    for path in dashboards:
        with open(path) as f:
            dashboard = json.load(f)
        for panel in dashboard["panels"]:
            panels += [t["expr"] for t in panel.get("targets", [])]

    deadline = time.monotonic() + timeout
    while True:
        groups = api(base, "rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        unhealthy = [f"rule {r['name']}: {r.get('lastError')}" for r in rules if r.get("health") == "err"]
        found = [] if len(rules) == expected_rules else [f"{len(rules)} rules loaded, {expected_rules} expected"]
        # The control: what a misspelling looks like must be seen as one.
        control = problems(base, [], ["sum(rate(outbox_publishedd_total[1m]))", 'consumer_events_total{result="deadd"}'])
        if len(control) != 4:
            sys.exit(f"the checker missed a misspelling: {control}")
        left = found + unhealthy + problems(base, [r["query"] for r in rules], panels)
        if not left:
            print(f"monitoring: {len(rules)} rules and {len(panels)} panel queries checked against real metrics")
            return
        if time.monotonic() > deadline:
            sys.exit("monitoring: after %.0f s:\n  %s" % (timeout, "\n  ".join(left)))
        time.sleep(3)


if __name__ == "__main__":
    main()
