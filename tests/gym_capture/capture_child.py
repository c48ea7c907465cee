"""A NeMo Gym model-server worker in a process of its own: Gym's capture path into a tape.

    python -m tests.gym_capture.capture_child TAPE

Reads one JSON command a line from stdin, answers one JSON line on stdout:
  {"rollout": ID, "seed": S, "turns": T, "first": K, "last": L, "state": {...} | null}
      run turns K..L-1 of that rollout (driver.run_rollout) and answer {"state": ...}
  {"many": PREFIX, "count": N, "seed": S, "turns": T}
      run N whole rollouts PREFIX-0.. concurrently and answer {"done": N}
  {"quit": true}
      close the sink and the lineage store and exit
The sink and lineage store stay open between commands, like a server's.
"""

from __future__ import annotations

import asyncio
import sys

import orjson

from recorder import TapeLineage, TapeSink
from tests.gym_capture.driver import run_rollout


async def main(tape: str) -> None:
    sink, lineage = TapeSink(tape), TapeLineage(tape)
    print(orjson.dumps({"ready": True}).decode(), flush=True)
    for line in sys.stdin:
        cmd = orjson.loads(line)
        if cmd.get("quit"):
            break
        if "many" in cmd:
            await asyncio.gather(*(run_rollout(sink, lineage, f"{cmd['many']}-{n}", cmd["seed"] + n, cmd["turns"])
                                   for n in range(cmd["count"])))
            answer = {"done": cmd["count"]}
        else:
            state = await run_rollout(sink, lineage, cmd["rollout"], cmd["seed"], cmd["turns"], first=cmd["first"],
                                      last=cmd["last"], state=cmd["state"])
            answer = {"state": state}
        print(orjson.dumps(answer).decode(), flush=True)
    await sink.close()
    await lineage.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
