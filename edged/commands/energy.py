"""`edged energy probe` and `edged energy watch`: which meters this machine has, and live power."""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import time
from typing import Any

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    energy = subparsers.add_parser("energy", help="energy meters: probe them, watch live power")
    sub = energy.add_subparsers(dest="energy_command", metavar="ACTION", required=True)

    probe = sub.add_parser("probe", help="which energy backends work here, and why others don't")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    _options(probe)
    probe.set_defaults(func=run_probe)

    watch = sub.add_parser("watch", help="a refreshing table of live power per rail")
    watch.add_argument(
        "--backend",
        default="auto",
        metavar="B",
        help="auto (default), nvml, ina3221, jtop, rapl or estimate",
    )
    watch.add_argument(
        "--seconds",
        type=float,
        default=None,
        metavar="N",
        help="stop after N seconds (default: until Ctrl-C)",
    )
    watch.add_argument(
        "--interval",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds between refreshes (default 0.5)",
    )
    _options(watch)
    watch.set_defaults(func=run_watch)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, e.g. -o period_s=0.1 -o gpu_indices=[0,1] "
        "-o sysfs_root=/sys (repeatable)",
    )


def _parse_options(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option {item!r} is not KEY=VALUE")
        try:
            value: Any = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string (paths, "all", "process")
        options[key.strip()] = value
    return options


def _fail(code: int, message: str) -> int:
    print(f"edged energy: error: {message}", file=sys.stderr)
    return code


def run_probe(args: argparse.Namespace) -> int:
    from edged.energy import EnergyConfigError, auto_choice, probe

    try:
        results = probe(**_parse_options(args.option))
    except (ValueError, EnergyConfigError) as exc:
        return _fail(EXIT_CONFIG, str(exc))
    choice = auto_choice(results)
    if args.json:
        print(
            json.dumps(
                {"auto": choice, "backends": {k: v.to_dict() for k, v in results.items()}}, indent=2
            )
        )
        return 0
    width = max(len(name) for name in results)
    for name, result in results.items():
        mark = "yes" if result.available else "no "
        print(f"{name:<{width}}  {mark}  {result.reason}")
        if result.available and result.scope:
            print(f"{'':<{width}}       measures: {result.scope}")
        if result.channels:
            print(f"{'':<{width}}       channels: {', '.join(result.channels)}")
    print(f"auto picks: {choice}")
    return 0


def _table(meter: Any, watts: dict[str, float], elapsed: float, joules: float,
           dynamic: float) -> list[str]:
    lines = [f"edged energy watch: {meter.backend} - {meter.scope} - {elapsed:.1f} s"]
    width = max([len("total"), *(len(ch) for ch in watts)])
    lines.append(f"{'rail':<{width}}  {'power W':>10}")
    if not watts:
        lines.append("(waiting for samples)")
    for name, value in watts.items():
        lines.append(f"{name:<{width}}  {value:>10.3f}")
    lines.append(f"since start: {joules:.3f} J, {dynamic:.3f} J above idle")
    return lines


def run_watch(args: argparse.Namespace) -> int:
    from edged.energy import BackendUnavailable, EnergyConfigError, EnergyError, create_meter

    if args.interval <= 0 or (args.seconds is not None and args.seconds < 0):
        return _fail(EXIT_CONFIG, "--interval must be > 0 and --seconds >= 0")
    try:
        meter = create_meter(args.backend, **_parse_options(args.option))
    except (ValueError, EnergyConfigError) as exc:
        return _fail(EXIT_CONFIG, str(exc))
    except BackendUnavailable as exc:
        return _fail(EXIT_UNAVAILABLE, str(exc))
    if meter.backend == "estimate":
        print(f"edged energy: note: the estimate meter has no sensor; it models {meter.scope}, "
              "here the CPU time of this `edged energy watch` process alone (a few mW), not the "
              "machine or the daemon. The daemon's replies and `edged stats` carry the estimate "
              "of each generation.", file=sys.stderr)
    tty = sys.stdout.isatty()
    start = time.monotonic()
    rails: list[str] = []
    joules = dynamic = 0.0
    whole = meter.window().open()  # the whole watch; refresh windows nest inside it
    tick = meter.window().open()
    try:
        while args.seconds is None or time.monotonic() - start < args.seconds:
            left = math.inf if args.seconds is None else args.seconds - (time.monotonic() - start)
            time.sleep(max(0.0, min(args.interval, left)))
            tick.close()
            try:
                joules += tick.record.joules
                dynamic += tick.record.dynamic_joules
            except EnergyError as exc:
                print(f"edged energy: warning: {exc}", file=sys.stderr)
            tick = meter.window().open()
            watts = meter.power_w()  # since the previous call: read once per refresh
            rails = rails or [name for name in watts if name != "total"]
            lines = _table(meter, watts, time.monotonic() - start, joules, dynamic)
            print(
                ("\x1b[H\x1b[J" if tty else "") + "\n".join(lines) + ("" if tty else "\n"),
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    finally:
        whole.close()
        meter.close()
    try:
        record = whole.record
    except EnergyError as exc:
        return _fail(EXIT_UNAVAILABLE, f"the watch window failed: {exc}")
    out = {"backend": meter.backend, "scope": meter.scope, **record.to_dict()}
    if not out.get("per_rail_j") and len(rails) == 1:
        # a one-channel meter (the estimate's "cpu"): the table showed that rail, say its joules
        out["per_rail_j"] = {rails[0]: out.get("joules")}
    print(json.dumps(out))
    return 0
