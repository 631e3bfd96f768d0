"""A lean HTTP load generator for the serving benches: N clients, each one keep-alive connection
sending its share of JSON POSTs one after another, in a process of its own on asyncio streams.

On a 2-core machine the clients share the CPU with the server they measure: httpx on threads
spends about 1 ms of CPU per request (the `openai` SDK more), as much as the server's own HTTP
work, and one process's GIL spaces 32 clients' requests out by that much. This one spends about
a third of it (less on uvloop, where installed), so the numbers are the server's. Run as a child:

    python bench/loadgen.py URL PATH CLIENTS < bodies.json   (a JSON list of request bodies)

prints {"wall": seconds, "latencies": [seconds per request], "failed": n} as JSON.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit


async def _client(host: str, port: int, path: str, bodies: list[bytes], key: str) -> list[float]:
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
    head += "Content-Type: application/json\r\n"
    latencies = []
    try:
        for body in bodies:
            start = time.perf_counter()
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if b" 200 " not in status:
                raise RuntimeError(f"{path} answered {status.decode().strip()}")
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()
    return latencies


async def _run(url: str, path: str, clients: int, bodies: list[bytes], key: str) -> dict[str, Any]:
    parts = urlsplit(url)
    shares = [bodies[i::clients] for i in range(clients)]
    start = time.perf_counter()
    done = await asyncio.gather(
        *(_client(parts.hostname or "127.0.0.1", parts.port or 80, path, s, key) for s in shares if s)
    )
    return {"wall": time.perf_counter() - start, "latencies": [x for d in done for x in d]}


def run(
    url: str, path: str, clients: int, bodies: list[dict], key: str = "none"
) -> tuple[float, list[float]]:
    """Wall seconds and each request's latency for `bodies` sent by `clients` clients, run in a
    child process (started before the clock starts: its import time is not counted)."""
    proc = subprocess.run(
        [sys.executable, __file__, url, path, str(clients), key],
        input=json.dumps(bodies),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"the load generator failed:\n{proc.stderr}")
    got = json.loads(proc.stdout)
    return got["wall"], got["latencies"]


if __name__ == "__main__":
    url, path, clients, key = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    bodies = [json.dumps(b).encode() for b in json.load(sys.stdin)]
    try:  # uvloop where installed (llmhost's dependencies hold it; not on Windows): less CPU
        from uvloop import run as arun
    except ImportError:
        from asyncio import run as arun
    print(json.dumps(arun(_run(url, path, clients, bodies, key))))
