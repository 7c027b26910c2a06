#!/usr/bin/env python3
"""Clients and a publisher for scripts/bench-feed (standard library only).

  feed_clients.py <feed host:port | redis host:port> <stream> <clients> <events> <rate/s> <mode> <pid>

mode `feed`: <clients> Server-Sent Events connections to the feed's /events; the RSS of the
feed process <pid> is read before and after they connect. mode `redis`: the baseline, <clients>
plain `XREAD BLOCK` readers on Redis itself. Then <events> events are added to the stream at
<rate>/s, each carrying its send time, and every client's receipt of every event is timed.
Prints one JSON line: rss_before, rss_after (kB; feed mode), latencies (ms) p50/p99/max, lost.
"""

import asyncio
import json
import os
import sys
import time
import uuid


def resp(*args):
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
    return b"".join(out)


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ulid_like():
    # A ULID: 48 bits of milliseconds and 80 random bits, Crockford base32.
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    n = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(alphabet[(n >> (5 * i)) & 31] for i in reversed(range(26)))


async def publish(redis_host, redis_port, stream, events, rate):
    reader, writer = await asyncio.open_connection(redis_host, redis_port)
    order = ulid_like()
    for seq in range(1, events + 1):
        payload = json.dumps({"order_id": order, "sent_ns": time.time_ns()})
        fields = ["event_id", ulid_like(), "event_type", "OrderConfirmed" if seq > 1 else "OrderCreated",
                  "aggregate_type", "order", "aggregate_id", order, "seq", seq,
                  "occurred_at", time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
                  "payload", payload, "tenant_id", "default"]
        writer.write(resp("XADD", stream, "*", *fields))
        await writer.drain()
        await reader.readline()
        await reader.readline()
        await asyncio.sleep(1 / rate)
    writer.close()


async def sse_client(host, port, latencies, ready, stop):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # response headers (the body is chunked)
    ready.release()
    buffer = b""
    while not stop.is_set():
        try:
            size_line = await asyncio.wait_for(reader.readline(), 1)
        except asyncio.TimeoutError:
            continue
        if not size_line.strip():
            return
        size = int(size_line.split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        buffer += chunk[:-2]
        now = time.time_ns()
        while b"\n\n" in buffer:
            message, buffer = buffer.split(b"\n\n", 1)
            for line in message.split(b"\n"):
                if line.startswith(b"data: {"):
                    sent = json.loads(line[6:])["payload"]["sent_ns"]
                    latencies.append((now - sent) / 1e6)
    writer.close()


async def read_reply(reader):
    """One RESP2 reply, as nested lists of bytes (None for a null)."""
    line = await reader.readuntil(b"\r\n")
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b"-", b":"):
        return rest
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else (await reader.readexactly(n + 2))[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [await read_reply(reader) for _ in range(n)]
    raise ValueError(f"unexpected reply {line!r}")


async def xread_client(host, port, stream, latencies, ready, stop):
    reader, writer = await asyncio.open_connection(host, port)
    last = "$"
    ready.release()
    while not stop.is_set():
        writer.write(resp("XREAD", "BLOCK", 1000, "STREAMS", stream, last))
        await writer.drain()
        reply = await read_reply(reader)
        now = time.time_ns()
        if not reply:
            continue
        for entry_id, fields in reply[0][1]:
            last = entry_id.decode()
            values = dict(zip(fields[::2], fields[1::2]))
            latencies.append((now - json.loads(values[b"payload"])["sent_ns"]) / 1e6)
    writer.close()


def pct(sorted_values, p):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


async def main():
    target, stream, clients, events, rate, mode, pid = sys.argv[1:8]
    clients, events, rate, pid = int(clients), int(events), float(rate), int(pid)
    redis_host, redis_port = os.environ.get("REDIS_HOSTPORT", "127.0.0.1:6379").split(":")
    host, port = target.split(":")
    latencies, stop, ready = [], asyncio.Event(), asyncio.Semaphore(0)
    before = rss_kb(pid) if mode == "feed" else 0
    if mode == "feed":
        tasks = [asyncio.create_task(sse_client(host, int(port), latencies, ready, stop)) for _ in range(clients)]
    else:
        tasks = [asyncio.create_task(xread_client(host, int(port), stream, latencies, ready, stop)) for _ in range(clients)]
    for _ in range(clients):
        await ready.acquire()
    await asyncio.sleep(2)
    after = rss_kb(pid) if mode == "feed" else 0
    await publish(redis_host, int(redis_port), stream, events, rate)
    await asyncio.sleep(3)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    values = sorted(latencies)
    print(json.dumps({
        "mode": mode, "clients": clients, "events": events,
        "rss_before_kb": before, "rss_after_kb": after,
        "p50_ms": pct(values, 0.50), "p99_ms": pct(values, 0.99), "max_ms": values[-1] if values else None,
        "received": len(values), "expected": clients * events,
    }))


if __name__ == "__main__":
    asyncio.run(main())
