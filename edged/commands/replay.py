"""`edged replay`: replay MESS+ trace CSVs through the router and baselines, print a table."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import edged

LEGEND = (
    "  mean sat / min sat: final satisfaction, mean and worst seed; SLA: met on every seed, or\n"
    "  MISS k/N -R: k of N seeds met alpha, the worst fell R satisfied requests short;\n"
    "  xrandom: random's J / the policy's (higher is cheaper); xoracle, xstatic, xtask: the\n"
    "  policy's J / oracle's, static_mix's, task_mix's (below 1 is cheaper); model columns: share\n"
    "  of requests each model ran on (exploration included)"
)


def default_traces() -> Path:
    """The MESS+ traces in the `shared` folder beside the checkout this package lives in (not
    the working directory, so the default works from anywhere); `EDGED_SHARED` overrides it."""
    env = os.environ.get("EDGED_SHARED")
    shared = Path(env) if env else Path(edged.__file__).resolve().parents[1].parent / "shared"
    return shared / "data" / "messplus"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay", help="replay MESS+ traces: router vs baselines (energy, satisfaction)",
        description="Replay trace CSVs (MESS+ simulator format) with shuffles per seed: one "
        "result per trace and alpha, or with --mix one interleaved stream of all of them.",
    )
    p.add_argument("paths", nargs="*", type=Path, default=None,
                   help="trace CSV files or directories (default: shared/data/messplus in the "
                   f"folder beside this checkout, here {default_traces()})")
    p.add_argument("--mix", action="store_true",
                   help="interleave every given trace into one stream named `mixed` (shuffled "
                   "per seed, one alpha for the whole stream; needs --alpha)")
    p.add_argument("--alpha", default=None, metavar="A[,A2,...]",
                   help="SLA (mean satisfaction to meet), or a comma list: one result per alpha "
                   "(default: the per-benchmark defaults; required with --mix)")
    p.add_argument("--seeds", type=int, default=5, help="shuffles per trace (default 5)")
    p.add_argument("--blocks", type=int, default=0, metavar="N",
                   help="serve runs of N requests of one benchmark at a time, the runs "
                   "shuffled (a user on one kind of task for a while; with --mix), instead of "
                   "one plain shuffle (default 0)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="first shuffle seed (default 0); a later range is a held-out check")
    p.add_argument("--labels", default="reference", metavar="SOURCE[,sparsity=P]",
                   help="labels the routers see: reference (every run, true labels) or "
                        "agreement (pseudo-labels: agreement with the top model on exploring "
                        "runs; ',sparsity=P' adds real labels of the served model on a share P "
                        "of requests). Satisfaction is always scored on the true labels")
    p.add_argument("--feedback-sparsity", type=float, default=None, metavar="P",
                   help="real labels on a share P of requests only (the paper's feedback "
                        "sparsity); with --labels agreement, the share of real labels")
    p.add_argument("--queue-labels", choices=("all", "real"), default="all",
                   help="edged's RouterConfig.queue_labels: which labels move its queue, "
                        "all (default) or only real ones (pseudo-labels then only teach the "
                        "predictor, and the SLA is on the real labels)")
    p.add_argument("--encoder", type=Path, default=None, metavar="DIR",
                   help="also run `edged+encoder`: edged with this sentence encoder's "
                   "embeddings as extra features (tools/export_encoder.py makes one; the "
                   "embeddings are computed once and cached outside the repository)")
    p.add_argument("--c", type=float, default=0.1, help="messplus exploration constant")
    p.add_argument("--V", type=float, default=0.001, help="messplus V per joule")
    p.add_argument("--json", type=Path, default=None,
                   help="write results as JSON (one object, or a list for several results)")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    p.set_defaults(func=run)


def parse_alphas(text: str | None) -> list[float] | None:
    """`0.7` or `0.65,0.7`; raises ValueError naming the bad item."""
    if text is None:
        return None
    alphas = []
    for item in text.split(","):
        try:
            alpha = float(item)
        except ValueError:
            raise ValueError(f"--alpha: not a number: {item.strip()!r}") from None
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--alpha: {alpha} is not in [0, 1]")
        alphas.append(alpha)
    return alphas


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from edged.replay import DEFAULT_ALPHA, TraceError, find_traces, load_trace, mix_traces
    from edged.replay.runner import EDGED, edged_factory, paper_factory

    def fail(message: str) -> int:
        print(f"edged replay: {message}", file=sys.stderr)
        return 2

    if args.seeds < 1:
        return fail("--seeds must be >= 1")
    if args.first_seed < 0:
        return fail("--first-seed must be >= 0")
    if args.blocks < 0:
        return fail("--blocks must be >= 0")
    try:
        alphas = parse_alphas(args.alpha)
    except ValueError as exc:
        return fail(str(exc))
    if args.mix and alphas is None:
        return fail("--mix needs --alpha (the per-benchmark defaults do not apply to a mixed "
                    "stream)")
    paths = args.paths
    if not paths:
        paths = [default_traces()]
        if not paths[0].is_dir():
            return fail(f"no traces at the default {paths[0]} (the shared folder beside this "
                        "checkout); pass trace CSVs or directories")
    try:
        traces = [load_trace(p) for p in find_traces(paths)]
    except TraceError as exc:
        return fail(str(exc))
    embeddings: list[Any] = [None] * len(traces)
    if args.encoder is not None:
        try:
            embeddings = embed_traces(args.encoder, traces)
        except ValueError as exc:  # EncoderError: what is wrong with the directory
            return fail(f"--encoder: {exc}")
    if args.mix:
        try:
            traces = [mix_traces(traces)]
        except TraceError as exc:
            return fail(str(exc))
        # mix_traces keeps the files' order, so their embeddings stack in it
        embeddings = [None if args.encoder is None else np.concatenate(embeddings)]
    jobs = []
    for trace, emb in zip(traces, embeddings, strict=True):
        if alphas is None and trace.benchmark not in DEFAULT_ALPHA:
            return fail(f"no default alpha for {trace.benchmark}; pass --alpha")
        jobs += [(trace, a, emb) for a in (alphas or [DEFAULT_ALPHA[trace.benchmark]])]
    try:
        labels = parse_labels(args.labels, args.feedback_sparsity)
    except ValueError as exc:
        return fail(str(exc))
    edged = EDGED.with_(queue_labels=args.queue_labels)
    edged = edged.for_agreement() if labels.source == "agreement" else edged
    routers = {"messplus": paper_factory(c=args.c, V=args.V), "edged": edged_factory(edged)}
    if args.encoder is not None:
        routers[ENCODED] = edged_factory(edged)
    results = replay_all(jobs, routers, args.seeds, args.first_seed, labels, args.blocks)
    if args.json is not None:
        data = [r.summary for r in results]
        args.json.write_text(json.dumps(data[0] if len(data) == 1 else data, indent=1) + "\n")
    if args.plot is not None:
        try:
            from edged.replay.plot import plot
        except ImportError:
            return fail("--plot needs matplotlib (extra `plot`)")
        plot(results, args.plot)
    return 0


def parse_labels(spec: str, sparsity: float | None) -> Any:
    """`--labels` and `--feedback-sparsity` as a LabelModel (ValueError naming the flag)."""
    from edged.replay.simulate import LabelModel

    source, _, rest = spec.partition(",")
    share = None
    if rest:
        key, _, value = rest.partition("=")
        if key != "sparsity":
            raise ValueError(f"--labels {spec!r}: expected SOURCE[,sparsity=P]")
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"--labels {spec!r}: sparsity {value!r} is not a number") from None
    if share is not None and sparsity is not None and share != sparsity:
        raise ValueError("--labels sparsity and --feedback-sparsity disagree")
    share = share if share is not None else sparsity
    if source not in ("reference", "agreement"):
        raise ValueError(f"--labels {spec!r}: source must be reference or agreement")
    default = 1.0 if source == "reference" else 0.0
    try:
        return LabelModel(source, default if share is None else share)
    except ValueError as exc:
        raise ValueError(f"--labels/--feedback-sparsity: {exc}") from None


#: the policy `--encoder` adds: edged's configuration with the encoder's embeddings
ENCODED = "edged+encoder"


def embed_traces(encoder_dir: Path, traces: Sequence[Any]) -> list[Any]:
    """Each trace's texts through the sentence encoder at `encoder_dir` (cached by content
    hash, see `edged.replay.embeddings`), with a status line on stderr; EncoderError (a
    ValueError naming the file) for a missing or broken encoder directory."""
    from edged.replay.embeddings import embed_texts
    from edged.router.encoder import SentenceEncoder

    encoder = SentenceEncoder(encoder_dir)
    out = []
    for trace in traces:
        def progress(done: int, total: int, name: str = trace.benchmark) -> None:
            print(f"\r\033[Kembedding {name}: {done}/{total}", end="", file=sys.stderr,
                  flush=True)

        out.append(embed_texts(encoder, trace.texts, progress=progress))
    print("\r\033[K", end="", file=sys.stderr, flush=True)
    return out


def replay_all(jobs: Sequence[tuple[Any, float, Any]], routers: dict, seeds: int,
               first_seed: int, labels: Any = None, block: int = 0) -> list:
    """Run and print each (trace, alpha); a status line on stderr when it is a terminal, since
    one mixed stream with the routers takes minutes."""
    from edged.replay import run_benchmark
    from edged.replay.runner import unreachable

    tty = sys.stderr.isatty()
    results = []
    for n, (trace, alpha, embeddings) in enumerate(jobs):
        why = unreachable(trace, alpha)
        if why is not None:
            sys.stdout.flush()  # keep it after the tables already printed
            print(f"edged replay: warning: {why} (running anyway)", file=sys.stderr)
        progress: Callable[[str], None] | None = None
        if tty:
            def progress(line: str, n: int = n) -> None:
                print(f"\r\033[K[{n + 1}/{len(jobs)}] {line}", end="", file=sys.stderr,
                      flush=True)
        results.append(run_benchmark(
            trace, alpha, seeds, routers, progress, first_seed, labels, embeddings,
            embedded={ENCODED} if ENCODED in routers else (), block=block))
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        print_table(results[-1].summary)
    print("\n" + LEGEND)
    return results


def print_table(summary: dict) -> None:
    """One block per (stream, alpha): a row per policy."""
    pol = summary["policies"]
    random_e = pol["random"]["energy_j_per_request"]
    alpha = summary["alpha"]
    first = summary.get("first_seed")
    seeds = summary["seeds"] if first is None else f"{summary['seeds']} from {first}"
    if summary.get("block"):
        seeds = f"{seeds}  in runs of {summary['block']} of one benchmark"
    reach = "  (unreachable: no model or static mix meets it)" if summary.get("unreachable") else ""
    print(f"\n{summary['benchmark']}  alpha={alpha}{reach}  requests={summary['requests']}"
          f"  seeds={seeds}")
    kinds = summary.get("benchmarks", {})
    if len(kinds) > 1:
        print("  " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
    models = summary["models"]
    widths = [max(6, len(m)) for m in models]
    print(f"  {'policy':20s} {'J/request':>9s} {'mean sat':>8s} {'min sat':>8s} {'SLA':>11s}"
          f" {'explore':>7s} {'xrandom':>7s} {'xoracle':>7s} {'xstatic':>7s} {'xtask':>7s} "
          + " ".join(f"{m:>{w}s}" for m, w in zip(models, widths, strict=True)))
    for name, p in pol.items():
        e = p["energy_j_per_request"]
        # seeds that met alpha, and the worst miss in requests: "MISS 3/5 -2"
        sla = ("met" if p["sla_met"]
               else f"MISS {p['seeds_met']}/{summary['seeds']} -{p['shortfall_requests']}")
        calls = " ".join(f"{c:{w}.2f}" for c, w in zip(p["call_ratio"], widths, strict=True))
        print(f"  {name:20s} {e:9.1f} {p['satisfaction']:8.4f} {p['min_satisfaction']:8.4f}"
              f" {sla:>11s} {p['explore_ratio']:7.3f} {random_e / e:7.2f}"
              f" {summary['oracle_ratio'][name]:7.2f} {summary['static_mix_ratio'][name]:7.2f}"
              f" {summary['task_mix_ratio'][name]:7.2f} {calls}")
