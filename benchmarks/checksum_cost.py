"""What ``CompactConfig(checksum=True)`` costs per exchange: bytes and time, in one process.

For each codec and shard shape, two sender/receiver pairs of ``ResidualCompressor`` (checksum
off and on) run the residual layer of one exchange exactly as the compressed collectives do
(``exchange_compressed``, ``send``, ``receive``, ``end_step`` on both sides) without the
network, so the difference is the checksum's own work: on the sender a pass over the payload
and one copy to append the 16-byte trailer, on the receiver a pass over the payload and a
16-byte comparison (no host read: the verdict joins the step's flags). Both pairs run
alternately on the same drifting activations, so the machine's slow drift hits both alike.

Times are the CPU time of the calling thread (``time.thread_time``; torch runs on that one
thread, ``--threads 1``), which a shared, overloaded machine inflates far less than wall time;
the wall-clock medians are in the CSV too. Rows (``checksum_cost.csv``): per codec, shape and
payload kind (``compressed`` steady state, ``raw`` warm-up), the payload bytes with and
without the trailer, the median exchange time (20th-80th percentile) of each pair, the
difference, and the time and GB/s of ``payload_checksum`` alone on that payload; stamped with
the CPU, threads, load average, torch version and date.

    python benchmarks/checksum_cost.py     # writes benchmarks/results/checksum_cost.csv
    python benchmarks/checksum_cost.py --reps 5 --out /tmp/bench   # quick smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import machine_stamp, write_csv  # noqa: E402
from compactfusion import CompactConfig, ResidualCompressor  # noqa: E402
from compactfusion.checksum import CHECKSUM_NBYTES, payload_checksum  # noqa: E402

SHAPES = [(1024, 3072), (4096, 3072)]  # a FLUX K/V shard of 1024 tokens; four times that
CODECS = ["int2", "int1", "fp8"]
FIELDS = [
    "codec",
    "shape",
    "dtype",
    "payload",
    "bytes_off",
    "bytes_on",
    "ms_off",
    "ms_off_p20",
    "ms_off_p80",
    "ms_on",
    "ms_on_p20",
    "ms_on_p80",
    "ms_added",
    "added_pct",
    "checksum_ms",
    "checksum_gbps",
    "wall_ms_off",
    "wall_ms_on",
    "reps",
    "device",
    "threads",
    "load1_at_start",
    "torch",
    "python",
    "date",
]


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), q[1], q[7]


class Pair:
    """A sender and a receiver compressor of one config, exchanging site ``("kv", 0)``."""

    def __init__(self, cfg: CompactConfig):
        self.sender, self.receiver = ResidualCompressor(cfg), ResidualCompressor(cfg)

    def exchange(self, x: torch.Tensor, compressed: bool | None = None) -> tuple[int, float, float]:
        """One exchange (compressed as the state decides, or as forced); (bytes, CPU
        seconds of this thread, wall seconds)."""
        start, wall = time.thread_time(), time.perf_counter()
        key, shape = ("kv", 0), tuple(x.shape)
        decided = self.sender.exchange_compressed("kv", [key], shape, x.dtype)
        self.receiver.exchange_compressed("kv", [key], shape, x.dtype)
        compressed = decided if compressed is None else compressed
        (payload,) = self.sender.send("kv", [(key, x)], compressed)
        out = torch.empty_like(x)
        self.receiver.receive("kv", key, payload, out, compressed)
        self.sender.end_step()
        self.receiver.end_step()
        return payload.numel(), time.thread_time() - start, time.perf_counter() - wall


def measure(codec: str, shape: tuple[int, ...], reps: int, dtype=torch.bfloat16) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen)
    cfg = CompactConfig(codec=codec, min_numel=0)
    pairs = {False: Pair(cfg), True: Pair(cfg.replace(checksum=True))}
    rows = []
    for kind in ("raw", "compressed"):
        times: dict[bool, list[float]] = {False: [], True: []}
        walls: dict[bool, list[float]] = {False: [], True: []}
        nbytes: dict[bool, int] = {}
        for step in range(reps + 2):  # the first two: warm-up (raw) and first compressed
            x = (base + 0.02 * step * torch.randn(shape, generator=gen)).to(dtype)
            for on, pair in pairs.items():
                forced = False if kind == "raw" else None
                n, seconds, wall = pair.exchange(x, forced)
                if step >= 2:
                    times[on].append(seconds)
                    walls[on].append(wall)
                    nbytes[on] = n
        payload = torch.randint(0, 256, (nbytes[False],), dtype=torch.uint8, generator=gen)
        ck = []
        for _ in range(reps):
            start = time.thread_time()
            payload_checksum(payload)
            ck.append(time.thread_time() - start)
        off, on, ck_ms = quantiles(times[False]), quantiles(times[True]), quantiles(ck)[0]
        rows.append(
            {
                "codec": codec,
                "shape": "x".join(map(str, shape)),
                "dtype": str(dtype).replace("torch.", ""),
                "payload": kind,
                "bytes_off": nbytes[False],
                "bytes_on": nbytes[True],
                "ms_off": round(off[0], 3),
                "ms_off_p20": round(off[1], 3),
                "ms_off_p80": round(off[2], 3),
                "ms_on": round(on[0], 3),
                "ms_on_p20": round(on[1], 3),
                "ms_on_p80": round(on[2], 3),
                "ms_added": round(on[0] - off[0], 3),
                "added_pct": round(100 * (on[0] - off[0]) / off[0], 1),
                "checksum_ms": round(ck_ms, 3),
                "checksum_gbps": round(nbytes[False] / (ck_ms * 1e-3) / 1e9, 2),
                "wall_ms_off": round(quantiles(walls[False])[0], 3),
                "wall_ms_on": round(quantiles(walls[True])[0], 3),
                "reps": reps,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="timed exchanges per row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_stamp(cuda=False)
    stamp = {
        **{name: machine[name] for name in ("device", "torch", "python", "date")},
        "threads": args.threads,
        "load1_at_start": round(os.getloadavg()[0], 1),
    }
    rows = []
    for codec in CODECS:
        for shape in SHAPES:
            for row in measure(codec, shape, args.reps):
                rows.append({**row, **stamp})
                print(
                    f"{codec:5s} {row['shape']:>9s} {row['payload']:10s} "
                    f"{row['bytes_off']:>9d} B (+{CHECKSUM_NBYTES}) "
                    f"{row['ms_off']:8.3f} -> {row['ms_on']:8.3f} ms "
                    f"(+{row['added_pct']}%), checksum {row['checksum_ms']:.3f} ms "
                    f"= {row['checksum_gbps']} GB/s"
                )
    path = write_csv(os.path.join(args.out, "checksum_cost.csv"), FIELDS, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
