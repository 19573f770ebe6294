"""Threads or processes for decoding? data.decode_one over the same photos, both ways, rounds alternating.

PIL releases the GIL while it decodes and resizes, but not everywhere; a process pool has no GIL
but pays for pickling each decoded image back. This measures which decodes a folder faster here,
with as many workers as cores, the way images.decode_many uses them (results in file order).

    python bench/decode_workers.py --photos FOLDER --limit 2000 --img-size 64
"""
import argparse
import functools
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalldata.cli import available_cpus  # noqa: E402
from smalldata.data import decode_one  # noqa: E402
from smalldata.folders import list_files  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, required=True)
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    paths = list_files(args.photos)[:args.limit]
    workers = available_cpus()
    work = functools.partial(decode_one, img_size=args.img_size)
    print(f"{len(paths)} photos from {args.photos} at {args.img_size} px, {workers} workers")
    rates = {"threads": [], "processes": []}
    for _ in range(args.rounds):
        for name, pool in (("threads", ThreadPoolExecutor), ("processes", ProcessPoolExecutor)):
            with pool(workers) as ex:
                t0 = time.perf_counter()
                n = sum(1 for _ in ex.map(work, paths, chunksize=1 if name == "threads" else 16))
                rates[name].append(n / (time.perf_counter() - t0))
    for name, r in rates.items():
        print(f"{name:10s} best {max(r):7.0f} images/s   rounds: {', '.join(f'{v:.0f}' for v in r)}")


if __name__ == "__main__":
    main()
