"""Client sub-commands: `edged ask`, `edged feedback`, `edged stats`, `edged health`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_REMOTE = 1     # the daemon answered with an error
EXIT_UNREACHABLE = 3  # no answer (not running, wrong endpoint, timeout)


EXIT_CODES = ("exit status: 0 done, 1 the daemon answered with an error, 3 no daemon reachable "
              "(no socket, nothing listening, or no reply in time)")


def _common(parser: argparse.ArgumentParser, timeout_s: float) -> None:
    parser.add_argument("--endpoint", help="daemon endpoint (default: $EDGED_ENDPOINT, else the "
                        "socket of a hand-started `edged serve` in the runtime directory, else "
                        "the systemd unit's /run/edged/edged.sock)")
    parser.add_argument("--timeout", type=float, default=timeout_s,
                        help=f"seconds to wait for the reply (default {timeout_s:g})")
    parser.add_argument("--server-key", type=Path, help="CURVE: the daemon's public key file")
    parser.add_argument("--client-cert", type=Path, help="CURVE: our key_secret file")


def register(subparsers: argparse._SubParsersAction) -> None:
    ask = subparsers.add_parser(
        "ask", help="send a prompt to the daemon", epilog=EXIT_CODES,
        description="Send PROMPT to the daemon; it routes it to a model of the zoo. The demo "
        "zoo only adds numbers: ask it e.g. '12+34='.")
    ask.add_argument("prompt", metavar="PROMPT")
    ask.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    ask.add_argument("--stream", action="store_true", help="print text as it is generated")
    ask.add_argument("--max-new-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--model", help="skip routing: use this model")
    ask.add_argument("--reference", help="gold answer: label the reply automatically")
    ask.add_argument("--deadline-ms", type=int)
    _common(ask, 60.0)
    ask.set_defaults(func=run_ask)

    fb = subparsers.add_parser("feedback", help="label a finished request (moves the router)",
                               epilog=EXIT_CODES)
    fb.add_argument("request_id", metavar="REQUEST_ID")
    group = fb.add_mutually_exclusive_group(required=True)
    group.add_argument("--satisfied", dest="satisfied", action="store_true")
    group.add_argument("--unsatisfied", dest="satisfied", action="store_false")
    fb.add_argument("--model", help="the model the label is for (default: the one that served)")
    _common(fb, 10.0)
    fb.set_defaults(func=run_feedback)

    stats = subparsers.add_parser("stats", help="per-model calls, energy, satisfaction, Q",
                                  epilog=EXIT_CODES)
    stats.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    stats.add_argument("--json", action="store_true", help="print as JSON")
    _common(stats, 5.0)
    stats.set_defaults(func=run_stats)

    health = subparsers.add_parser(
        "health", help="is the daemon up? (exit 0 when serving)",
        epilog="exit status: 0 serving, 1 draining (stopping) or an error reply, 3 no daemon "
        "reachable (no socket, nothing listening, or no reply within --timeout)")
    _common(health, 2.0)
    health.set_defaults(func=run_health)


def endpoint_of(args: argparse.Namespace) -> str:
    """--endpoint, else `edged.client.default_endpoint()` (the one `Client()` uses too)."""
    if args.endpoint:
        return str(args.endpoint)
    from edged.client import default_endpoint
    from edged.paths import InsecureDirError, check_private_dir

    endpoint = default_endpoint()
    if endpoint.startswith("ipc://") and not os.environ.get("EDGED_ENDPOINT"):
        directory = Path(endpoint[len("ipc://"):]).parent
        if directory.exists():  # a socket in a directory others can change may not be ours
            try:
                check_private_dir(directory)
            except InsecureDirError as exc:
                raise SystemExit(f"edged: not connecting: {exc}") from None
    return endpoint


def _client(args: argparse.Namespace, retries: int = 0) -> Any:
    """One attempt: the command's --timeout is the whole wait."""
    from edged.client import Client

    return Client(endpoint_of(args), timeout_s=args.timeout, retries=retries,
                  curve_server_key=args.server_key, curve_client_cert=args.client_cert)


def _call(args: argparse.Namespace, fn: Any) -> int:
    """Run `fn(client)`, mapping client errors to exit codes and a one-line message."""
    from edged.client import ClientError, DaemonNotRunning, RemoteError, RequestTimeout

    try:
        with _client(args) as client:
            return int(fn(client))
    except RemoteError as exc:
        print(f"edged: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_REMOTE
    except DaemonNotRunning as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RequestTimeout as exc:
        print(f"edged: {exc} (is `edged serve` running, and on this endpoint?)",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except ClientError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def run_ask(args: argparse.Namespace) -> int:
    fields = {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "seed": args.seed, "model": args.model, "reference": args.reference,
        "deadline_ms": args.deadline_ms,
    }

    def ask(client: Any) -> int:
        if args.stream:
            stream = client.stream(args.prompt, **fields)
            for delta in stream:
                if not args.json:
                    print(delta, end="", flush=True)
            reply = stream.reply
            if not args.json:
                print()
        else:
            reply = client.generate(args.prompt, **fields)
            if not args.json:
                print(reply["text"])
        if args.json:
            print(json.dumps(reply, indent=2, sort_keys=True))
        else:
            energy = reply.get("energy") or {}
            joules = energy.get("joules")
            cost = f"{joules:.3f} J" if isinstance(joules, (int, float)) else "energy n/a"
            print(f"[{reply['model']} · {cost} · id {reply['id']}]", file=sys.stderr)
        return 0

    return _call(args, ask)


def run_feedback(args: argparse.Namespace) -> int:
    def feedback(client: Any) -> int:
        reply = client.feedback(args.request_id, args.satisfied, model=args.model)
        print(json.dumps(reply["labels"], sort_keys=True))
        return 0

    return _call(args, feedback)


def run_stats(args: argparse.Namespace) -> int:
    def stats(client: Any) -> int:
        reply = client.stats()
        if args.prometheus:
            sys.stdout.write(prometheus_text(reply))
        elif args.json:
            print(json.dumps(reply, indent=2, sort_keys=True))
        else:
            print(stats_table(reply))
        return 0

    return _call(args, stats)


def run_health(args: argparse.Namespace) -> int:
    def health(client: Any) -> int:
        reply = client.health(args.timeout)
        print(json.dumps({k: v for k, v in reply.items() if k not in ("v", "ok", "id")},
                         sort_keys=True))
        return 0 if reply.get("status") == "serving" else EXIT_REMOTE

    return _call(args, health)


def stats_table(stats: dict[str, Any]) -> str:
    """Per-model calls, energy and satisfaction, then the router's alpha, Q and explorations."""
    router = stats.get("router") or {}
    rmodels = router.get("models") or {}
    served = stats.get("models") or {}
    lines = [f"{'model':<20} {'calls':>7} {'served':>7} {'joules':>12} {'J/call':>10} "
             f"{'labels':>7} {'satisf.':>8}"]
    for name in rmodels or served:
        s, r = served.get(name, {}), rmodels.get(name, {})
        mean = s.get("mean_joules")
        sat = s.get("satisfaction")
        lines.append(
            f"{name:<20} {s.get('calls', 0):>7} {r.get('served', 0):>7} "
            f"{s.get('joules', 0.0):>12.3f} {_num(mean, 10, 4)} {s.get('labels', 0):>7} "
            f"{_num(sat, 8, 3)}"
        )
    mean_sat = router.get("mean_satisfaction")
    lines.append(
        f"requests {router.get('t', 0)}  explorations {router.get('explorations', 0)}  "
        f"alpha {router.get('alpha')}  satisfaction {_num(mean_sat, 0, 3).strip()}  "
        f"Q {_num(router.get('q'), 0, 3).strip()}  queue {stats.get('queue', 0)}/"
        f"{stats.get('queue_size', 0)}  errors {sum((stats.get('errors') or {}).values())}"
    )
    return "\n".join(lines)


def _num(value: Any, width: int, digits: int) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:>{width}.{digits}f}"
    return f"{'-':>{width}}"


def prometheus_text(stats: dict[str, Any]) -> str:
    """The stats reply in the Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], Any]]) -> None:
        samples = [(labels, v) for labels, v in samples
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not samples:
            return
        out.append(f"# HELP edged_{name} {help_}")
        out.append(f"# TYPE edged_{name} {kind}")
        for labels, value in samples:
            tag = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"edged_{name}{{{tag}}} {float(value)!r}" if tag
                       else f"edged_{name} {float(value)!r}")

    router = stats.get("router") or {}
    served = stats.get("models") or {}
    rmodels = router.get("models") or {}
    names = list(rmodels or served)

    def per(key: str, src: dict[str, Any]) -> list[tuple[dict[str, str], Any]]:
        return [({"model": n}, (src.get(n) or {}).get(key)) for n in names]

    metric("model_calls_total", "counter", "Generations run per model.", per("calls", served))
    metric("model_served_total", "counter", "Requests served per model.", per("served", rmodels))
    metric("model_energy_joules_total", "counter", "Joules measured per model.",
           per("joules", served))
    metric("model_labels_total", "counter", "Labels received per model.", per("labels", served))
    metric("model_satisfied_total", "counter", "Satisfied labels per model.",
           per("satisfied", served))
    metric("router_requests_total", "counter", "Routing decisions.", [({}, router.get("t"))])
    metric("router_explorations_total", "counter", "Exploration decisions.",
           [({}, router.get("explorations"))])
    metric("router_queue", "gauge", "MESS+ virtual queue Q.", [({}, router.get("q"))])
    metric("router_alpha", "gauge", "Satisfaction target.", [({}, router.get("alpha"))])
    metric("router_mean_satisfaction", "gauge", "Mean satisfaction of served requests.",
           [({}, router.get("mean_satisfaction"))])
    metric("requests_completed_total", "counter", "Generations answered.",
           [({}, stats.get("completed"))])
    metric("messages_received_total", "counter", "Messages received.",
           [({}, stats.get("received"))])
    metric("errors_total", "counter", "Error replies by code.",
           [({"code": c}, n) for c, n in sorted((stats.get("errors") or {}).items())])
    metric("queue_depth", "gauge", "Generations waiting.", [({}, stats.get("queue"))])
    metric("in_flight", "gauge", "Generations queued or running.", [({}, stats.get("in_flight"))])
    metric("uptime_seconds", "gauge", "Seconds since start.", [({}, stats.get("uptime_s"))])
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
