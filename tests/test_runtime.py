"""The process-wide runtime tuning (``gateway.runtime``) has the effect it is there for. The
numbers are the kernel's counters (page faults), not timings, in fresh processes: the C
allocator's state is per process and changes with everything the process did before."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import tree_env


READS = 2000

# asyncio's own socket transport reading small messages one at a time, as a capture reads tokens;
# prints the page faults the reads cost.
PROBE = """
import asyncio, resource, sys
from gateway import runtime
if sys.argv[1] == "tuned":
    assert runtime.tune_malloc()

async def main() -> None:
    got = asyncio.Queue()

    class Sink(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            got.put_nowait(len(data))

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", 0)
    _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
    for _ in range(50):  # warm
        writer.write(b"x" * 250)
        await got.get()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(READS):
        writer.write(b"x" * 250)
        await got.get()  # one read per message
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

asyncio.run(main())
""".replace("READS", str(READS))


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=tree_env(), capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_a_socket_read_of_one_token_maps_no_memory_once_tuned() -> None:
    """asyncio reads a socket into a 256 KiB buffer and shrinks it. With glibc's defaults each such
    read maps fresh memory and faults it in (an mmap, a mremap, a munmap, a page fault: as much CPU
    as all else a token's read does); tuned, the buffer comes from the heap."""
    untuned = faults("default")
    if untuned < READS * 0.5:
        pytest.skip(f"this C library maps no memory per read ({untuned} faults for {READS} reads)")
    assert faults("tuned") < READS * 0.05
