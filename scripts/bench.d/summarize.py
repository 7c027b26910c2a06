"""Turns the raw outputs of scripts/bench's parts into summary.md and summary.json.

Only figures found in the outputs are reported; a part that did not run is left out.
"""

import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])


def read_env(path):
    env = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value
    return env


def number(pattern, text):
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else None


machine = read_env(out / "machine.env")
rows = []  # (measurement, result, baseline, ratio, target, met)
summary = {"machine": machine}


def met(ok):
    return "yes" if ok else "**no**"


api_path = out / "api.json"
if api_path.exists():
    api = json.loads(api_path.read_text())
    summary["api"] = api
    a = api["api"]
    rows.append((
        f"API: orders created/s at saturation (order-service alone, {a['clients']} clients, pool {a['db_pool']})",
        f"{a['orders_per_s']:.0f}/s",
        f"pgbench same transaction, {a['db_pool']} clients: {a['pgbench_tps']:.0f} tps",
        f"{a['ratio']:.2f}",
        ">= 0.70",
        met(a["ratio"] >= 0.7),
    ))
    peak = api["system_peak"]
    rows.append((
        "whole system peak (mix: create, 50 % confirm, 20 % cancel; 2 relays, 3 consumers)",
        f"{peak['orders_per_s']:.0f} orders/s, {peak['requests_per_s']:.0f} requests/s",
        "",
        "",
        "",
        "",
    ))
    for share in (50, 80):
        run = api[f"end_to_end_{share}"]
        e2e = run.get("end_to_end") or {}
        lat = e2e.get("latency")
        if not lat:
            rows.append((f"end to end at {share} % of peak", "not measured", "", "", "", ""))
            continue
        target = "p50 <= 5 ms, p99 <= 25 ms" if share == 50 else ""
        ok = met(lat["p50_ms"] <= 5 and lat["p99_ms"] <= 25) if share == 50 else ""
        rows.append((
            f"end to end at {share} % of peak ({run['target_rate']:.0f} orders/s offered, "
            f"{e2e['applied']}/{e2e['events']} events applied)",
            f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms",
            f"API p50 {run['latency']['p50_ms']:.1f} ms, p99 {run['latency']['p99_ms']:.1f} ms",
            "",
            target,
            ok,
        ))

relay_path = out / "relay.txt"
if relay_path.exists():
    text = relay_path.read_text()
    raw = number(r"^raw SQL drain.*?: (\d+) rows/s", text)
    xadd = number(r"redis-benchmark pipelined XADD.*?: (\d+) entries/s", text)
    relay = {"raw_sql_drain": raw, "redis_benchmark_xadd": xadd,
             "rounds": re.findall(r"^(round \d+: .*)$", text, re.MULTILINE)}
    for n in (1, 3):
        rate = number(rf"^relay x{n}: (\d+) events/s", text)
        # The median of the rounds' own ratios, as the script prints it.
        share = number(rf"^relay x{n}: \d+ events/s \(([\d.]+) of raw SQL drain\)", text)
        relay[f"relay_x{n}"] = rate
        relay[f"relay_x{n}_share_of_sql"] = share
        if rate and share:
            rows.append((
                f"relay drain, {n} relay{'s' if n > 1 else ''} (median of {len(relay['rounds']) or 1} rounds)",
                f"{rate:.0f} events/s",
                f"raw SQL drain {raw:.0f} rows/s; redis-benchmark XADD {xadd:.0f}/s" if xadd else f"raw SQL drain {raw:.0f} rows/s",
                f"{share:.2f} of SQL" + (f", {rate / xadd:.2f} of XADD" if xadd else ""),
                ">= 50000/s and >= 0.33 of SQL",
                met(rate >= 50000 and share >= 1 / 3),
            ))
    idle = re.search(r"idle commit-to-publish (.*)", text)
    if idle:
        relay["idle_commit_to_publish"] = idle.group(1).strip()
        rows.append(("relay idle commit-to-publish", idle.group(1).strip(), "", "", "", ""))
    summary["relay"] = relay

consumer_path = out / "consumer.txt"
if consumer_path.exists():
    text = consumer_path.read_text()
    consumer = {"rounds": re.findall(r"^(round \d+: .*)$", text, re.MULTILINE)}
    for n, word in ((1, "replica"), (3, "replicas")):
        rate = number(rf"consumer, {n} {word}\s+(\d+)", text)
        times = number(rf"consumer, {n} {word}\s+\d+\s+([\d.]+)x", text)
        base = number(rf"pgbench per-event SQL, {n} clients?\s+(\d+)", text)
        consumer[f"consumer_x{n}"] = rate
        consumer[f"pgbench_{n}_clients"] = base
        if rate:
            rows.append((
                f"consumer, {n} {word} (median of {len(consumer['rounds']) or 1} rounds)",
                f"{rate:.0f} events/s",
                f"pgbench per-event SQL, {n} client{'s' if n > 1 else ''}: {base:.0f} tps" if base else "",
                f"{times:.1f}" if times else "",
                ">= 20000/s",
                met(rate >= 20000),
            ))
    summary["consumer"] = consumer

lines = [
    f"Measured {machine.get('date', '?')} on {machine.get('cores', '?')} cores ({machine.get('cpu', '?')}, "
    f"{machine.get('memory_gib', '?')} GiB), Postgres {machine.get('postgres', '?')} "
    f"({machine.get('postgres_settings', '')}), Redis {machine.get('redis', '?')} "
    f"(appendonly {machine.get('redis_appendonly', '?')}), commit {machine.get('commit', '?')}; "
    f"load average before/after: {machine.get('load_before', '?')} / {machine.get('load_after', '?')}.",
    "",
    "| measurement | result | baseline (same run) | ratio | target | met |",
    "|---|---|---|---|---|---|",
]
lines += ["| " + " | ".join(r) + " |" for r in rows]
for part in ("relay", "consumer"):
    if summary.get(part, {}).get("rounds"):
        lines += ["", f"{part} rounds:", ""] + [f"- {r}" for r in summary[part]["rounds"]]
(out / "summary.md").write_text("\n".join(lines) + "\n")
summary["rows"] = [dict(zip(("measurement", "result", "baseline", "ratio", "target", "met"), r)) for r in rows]
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
