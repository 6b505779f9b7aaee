"""Client side of the multi-host test, run inside the broker's network namespace.

    python -m tests.integration.netns_driver --connect ADDR --curve-secret S --curve-server-key P \
        burst N MAX_TOKENS

sends N concurrent non-streaming requests and prints one JSON line: each request's
finish reason, or ``error:<code>``.

    python -m tests.integration.netns_driver ... greedy MAX_TOKENS ID,ID,...

sends one greedy request with those prompt token ids and prints its token ids as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from actors.curve import load_client_keys
from mlx_fleet.client import AsyncClient, FleetError


async def burst(connect: str, curve: dict[str, bytes], count: int, max_tokens: int) -> list[str]:
    """``count`` concurrent requests; their outcomes in order."""
    async with AsyncClient(connect, timeout_s=240, curve=curve) as client:
        async def one(i: int) -> str:
            try:
                done = await client.generate(f"Story {i}: once upon a time", model="demo", max_tokens=max_tokens)
                return done.finish_reason
            except FleetError as exc:
                return f"error:{exc.code}"

        return list(await asyncio.gather(*(one(i) for i in range(count))))


async def greedy(connect: str, curve: dict[str, bytes], max_tokens: int, ids: list[int]) -> list[int]:
    """One greedy request by prompt token ids; its generated token ids."""
    async with AsyncClient(connect, timeout_s=240, curve=curve) as client:
        done = await client.generate(model="demo", prompt_tokens=ids, max_tokens=max_tokens)
        return list(done.token_ids)


def main() -> None:
    """Parse the arguments, run the burst, print its outcomes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", required=True)
    ap.add_argument("--curve-secret", required=True)
    ap.add_argument("--curve-server-key", required=True)
    ap.add_argument("command", choices=["burst", "greedy"])
    ap.add_argument("count", type=int, help="burst: how many requests; greedy: max_tokens")
    ap.add_argument("max_tokens", help="burst: max_tokens; greedy: the prompt's token ids, comma-separated")
    args = ap.parse_args()
    curve = load_client_keys(args.curve_secret, args.curve_server_key)
    if args.command == "greedy":
        ids = [int(t) for t in args.max_tokens.split(",")]
        print(json.dumps(asyncio.run(greedy(args.connect, curve, args.count, ids))), flush=True)
        return
    print(json.dumps(asyncio.run(burst(args.connect, curve, args.count, int(args.max_tokens)))), flush=True)


if __name__ == "__main__":
    main()
