"""CPU cost of edged's power sampler at 10/20/100 Hz against a no-sampler baseline.

The process sleeps for --duration seconds while the sampler thread polls an INA3221 tree (by
default a fake Orin Nano tree, 3 rails = 6 files, on tmpfs; --sysfs-root /sys on a Jetson reads
the real sensors); the CPU time the process used, minus the baseline's (same sleep, no sampler),
is the overhead, in % of one core. Target: < 1 % of one core at 20 Hz. It also times a window
open+close (two synchronous edge reads) with the sampler running. Prints a table, writes JSON
(and a PNG with --plot).

    python tools/bench/energy_overhead.py --duration 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET_PCT_AT_20HZ = 1.0


def fake_orin_nano(root: Path) -> None:
    hw = root / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    hw.mkdir(parents=True)
    for n, (label, ma) in enumerate(
        [("VDD_IN", 1400), ("VDD_CPU_GPU_CV", 500), ("VDD_SOC", 300)], start=1
    ):
        (hw / f"in{n}_label").write_text(label + "\n")
        (hw / f"in{n}_input").write_text("5000\n")
        (hw / f"curr{n}_input").write_text(f"{ma}\n")
    (hw / "in7_label").write_text("sum of shunt voltages\n")


def cpu_over(seconds: float, meter_factory=None) -> tuple[float, int]:
    """(process CPU seconds spent while sleeping `seconds`, samples taken)."""
    meter = meter_factory() if meter_factory else None
    try:
        c0 = time.process_time()
        s0 = meter.sampler.sample_count if meter else 0
        time.sleep(seconds)
        c1 = time.process_time()
        s1 = meter.sampler.sample_count if meter else 0
    finally:
        if meter:
            meter.close()
    return c1 - c0, s1 - s0


def window_cost_us(meter_factory, n: int) -> float:
    meter = meter_factory()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            with meter.window() as w:
                pass
            _ = w.record
        return (time.perf_counter() - t0) / n * 1e6
    finally:
        meter.close()


def status(text: str) -> None:
    print(f"\r\x1b[K{text}", end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 20.0, 100.0], metavar="HZ")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per rate (median)")
    parser.add_argument("--windows", type=int, default=2000, help="windows timed for cost")
    parser.add_argument(
        "--sysfs-root",
        default=None,
        help="real sysfs root (default: a fake Orin Nano tree on tmpfs)",
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench/energy_overhead.json"))
    parser.add_argument("--plot", action="store_true", help="also write a PNG beside the JSON")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.repeats < 1 or any(r <= 0 for r in args.rates):
        parser.error("--duration, --repeats and --rates must be positive")

    from edged.energy import Ina3221Config, Ina3221Meter

    tmp = None
    if args.sysfs_root is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        tmp = tempfile.TemporaryDirectory(prefix="edged-bench-sysfs-", dir=base)
        fake_orin_nano(Path(tmp.name))
        root, tree = tmp.name, "fake Orin Nano INA3221 tree on tmpfs (3 rails, 6 files)"
    else:
        root, tree = args.sysfs_root, f"real sysfs at {args.sysfs_root}"

    def factory(rate: float):
        return lambda: Ina3221Meter(Ina3221Config(sysfs_root=root, period_s=1.0 / rate))

    rows = []
    try:
        base_runs = []
        for i in range(args.repeats):
            status(f"baseline (no sampler) run {i + 1}/{args.repeats}")
            base_runs.append(cpu_over(args.duration)[0])
        baseline = statistics.median(base_runs)
        rows.append(
            {
                "config": "no sampler (baseline)",
                "rate_hz": 0.0,
                "cpu_s": baseline,
                "samples": 0,
                "overhead_pct_core": 0.0,
                "per_sample_us": None,
            }
        )
        for rate in args.rates:
            runs = []
            for i in range(args.repeats):
                status(f"sampler at {rate:g} Hz run {i + 1}/{args.repeats}")
                runs.append(cpu_over(args.duration, factory(rate)))
            cpu = statistics.median(r[0] for r in runs)
            samples = int(statistics.median(r[1] for r in runs))
            extra = max(0.0, cpu - baseline)
            rows.append(
                {
                    "config": f"sampler {rate:g} Hz",
                    "rate_hz": rate,
                    "cpu_s": cpu,
                    "samples": samples,
                    "overhead_pct_core": 100.0 * extra / args.duration,
                    "per_sample_us": 1e6 * extra / samples if samples else None,
                }
            )
        status(f"timing {args.windows} windows with the sampler at 20 Hz")
        win_us = window_cost_us(factory(20.0), args.windows)
    finally:
        status("")
        if tmp is not None:
            tmp.cleanup()

    print(
        f"energy sampler overhead: {tree}, {args.duration:g} s x {args.repeats} runs "
        f"(median), CPU time of the whole process"
    )
    print(
        f"{'config':<24}{'samples':>9}{'CPU s':>10}{'% of 1 core':>14}{'us/sample':>11}"
        f"{'x 1% budget':>13}"
    )
    for row in rows:
        per = "-" if row["per_sample_us"] is None else f"{row['per_sample_us']:.1f}"
        budget = row["overhead_pct_core"] / TARGET_PCT_AT_20HZ
        print(
            f"{row['config']:<24}{row['samples']:>9}{row['cpu_s']:>10.4f}"
            f"{row['overhead_pct_core']:>14.3f}{per:>11}{budget:>13.3f}"
        )
    print(f"window open+close (2 edge reads + record): {win_us:.1f} us")
    at20 = next((r for r in rows if r["rate_hz"] == 20.0), None)
    verdict = None
    if at20 is not None:
        verdict = at20["overhead_pct_core"] < TARGET_PCT_AT_20HZ
        print(
            f"20 Hz target < {TARGET_PCT_AT_20HZ}% of one core: "
            f"{'met' if verdict else 'MISSED'} ({at20['overhead_pct_core']:.3f}%)"
        )

    result = {
        "tree": tree,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "baseline": "no sampler",
        "rows": rows,
        "window_open_close_us": win_us,
        "target_pct_core_at_20hz": TARGET_PCT_AT_20HZ,
        "target_met": verdict,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar([r["config"] for r in rows], [r["overhead_pct_core"] for r in rows])
        ax.axhline(TARGET_PCT_AT_20HZ, color="red", linestyle="--", label="1% budget")
        ax.set_ylabel("% of one core")
        ax.legend()
        fig.autofmt_xdate()
        fig.tight_layout()
        png = args.out.with_suffix(".png")
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
