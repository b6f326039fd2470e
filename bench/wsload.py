#!/usr/bin/env python3
"""A small, bounded WebSocket echo load generator (wrk cannot speak WebSocket).

``N`` clients each keep one connection and send a 32-byte text message, wait for its echo,
and repeat until the duration ends; prints one JSON line: messages/s, p99 round trip in ms,
errors.  Runs on uvloop when available.  Usage: wsload.py ws://127.0.0.1:8000/ --connections 64
--duration 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from websockets.asyncio.client import connect

MESSAGE = "x" * 32


async def client(url: str, stop_at: float, latencies: list[float], errors: list[int]) -> None:
    try:
        async with connect(url, compression=None, max_queue=None, ping_interval=None,
                           open_timeout=10) as ws:
            clock = time.perf_counter
            while clock() < stop_at:
                start = clock()
                await ws.send(MESSAGE)
                reply = await asyncio.wait_for(ws.recv(), 10)
                latencies.append(clock() - start)
                if reply != MESSAGE:
                    errors[0] += 1
    except Exception:  # any failure (refused, closed, timed out) counts as an error
        errors[0] += 1


async def main(url: str, connections: int, duration: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = [0]
    start = time.perf_counter()
    stop_at = start + duration
    await asyncio.wait_for(
        asyncio.gather(*(client(url, stop_at, latencies, errors) for _ in range(connections))),
        duration + 20)
    elapsed = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0
    return {"rps": len(latencies) / elapsed, "p99_ms": p99, "errors": errors[0],
            "messages": len(latencies)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(main(args.url, args.connections, args.duration))))
