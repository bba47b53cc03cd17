#!/usr/bin/env python3
"""How long the LMDB writer's group put takes when another Python thread is busy.

    .venv/bin/python bench/lmdb_gil.py [--records 3000] [--repeats 20]

py-lmdb releases the GIL around every single put of a ``putmulti`` and takes it back after,
so the gateway's writer thread waits for the event loop's thread once per record whenever
the loop is busy. This puts ``--records`` records of 230 bytes under 1,000 stream prefixes
(the shape of one commit group at 1,000 token streams) in one write transaction, without
fsync, first with nothing else running, then with a second thread running Python code
(the stand-in for a saturated event loop), and prints the mean time per group for each.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import lmdb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as path:
        env = lmdb.open(path, map_size=1 << 32, sync=False, max_dbs=2)
        db = env.open_db(b"events")
        group = [0]

        def put_group() -> None:
            group[0] += 1
            records = [(b"stream/%05d/%016d" % (i % 1000, group[0] * args.records + i), b"x" * 230)
                       for i in range(args.records)]
            with env.begin(write=True) as txn:
                txn.cursor(db=db).putmulti(records)

        def timed() -> float:
            start = time.perf_counter()
            for _ in range(args.repeats):
                put_group()
            return (time.perf_counter() - start) / args.repeats * 1000

        alone = timed()
        stop = threading.Event()

        def busy() -> None:
            n = 0
            while not stop.is_set():
                n += 1

        thread = threading.Thread(target=busy)
        thread.start()
        try:
            contended = timed()
        finally:
            stop.set()
            thread.join()
        env.close()
    print(f"{args.records} records per group: {alone:.1f} ms alone, {contended:.1f} ms beside a busy Python thread "
          f"({contended / alone:.0f}x)")


if __name__ == "__main__":
    main()
