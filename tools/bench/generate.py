"""Benchmark edged's generation loop against optimum's ORTModelForCausalLM.generate.

Both engines run the same ONNX file with the same onnxruntime thread settings, greedy, same
prompt and token budget, each in its own subprocess (so peak RSS is per engine), alternating,
with one warm-up and the median of --repeats runs. Reports time to first token, decode tokens/s
(tokens after the first / time after the first), peak RSS and the ratio edged/optimum; checks
that both produced the same token ids. Prints a table, writes JSON (and a PNG with --plot).

    python tools/bench/generate.py --model ../shared/models/stories260K/onnx --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ENGINES = ("edged", "optimum")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_edged(model_dir: str, prompt: str, n: int, threads: int, repeats: int) -> dict:
    from edged.zoo import GenerationParams, load_model

    t = time.perf_counter()
    model = load_model(model_dir, intra_op_threads=threads, inter_op_threads=threads)
    load_s = time.perf_counter() - t
    params = GenerationParams(max_new_tokens=n)
    runs = []
    for _ in range(repeats + 1):  # the first is the warm-up
        r = model.generate(prompt, params=params)
        runs.append({"ttft_ms": r.ttft_ms, "total_ms": r.total_ms, "ids": r.token_ids,
                     "tokens_per_s": r.tokens_per_s})
    return {"load_s": load_s, "runs": runs[1:], "provider": model.provider}


def run_optimum(model_dir: str, prompt: str, n: int, threads: int, repeats: int) -> dict:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Stamps the moment generate() hands out each new token (the first put is the prompt)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    torch.set_num_threads(max(threads, 1))
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = threads
    t = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(model_dir, session_options=so,
                                                provider="CPUExecutionProvider")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_s = time.perf_counter() - t
    runs = []
    for _ in range(repeats + 1):
        clock = Clock()
        t0 = time.perf_counter()
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, streamer=clock,
                             pad_token_id=tokenizer.eos_token_id)
        t_end = time.perf_counter()
        ids = out[0, enc.input_ids.shape[1]:].tolist()
        first = clock.stamps[1]
        runs.append({"ttft_ms": (first - t0) * 1e3, "total_ms": (t_end - t0) * 1e3, "ids": ids,
                     "tokens_per_s": (len(ids) - 1) / (t_end - first) if len(ids) > 1 else 0.0})
    return {"load_s": load_s, "runs": runs[1:], "provider": model.providers[0]}


def worker(args: argparse.Namespace) -> None:
    fn = run_edged if args.worker == "edged" else run_optimum
    out = fn(args.model[0], args.prompt, args.max_new_tokens, args.threads, args.repeats)
    out["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(out))


def _spawn(engine: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--model", model, "--prompt",
           args.prompt, "--max-new-tokens", str(args.max_new_tokens), "--threads",
           str(args.threads), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} on {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(raw: dict) -> dict:
    runs = raw["runs"]
    return {
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "ttft_ms_best": min(r["ttft_ms"] for r in runs),
        "tokens_per_s_best": max(r["tokens_per_s"] for r in runs),
        "runs": len(runs),
        "total_ms": statistics.median(r["total_ms"] for r in runs),
        "completion_tokens": len(runs[0]["ids"]),
        "peak_rss_mb": raw["peak_rss_mb"],
        "load_s": raw["load_s"],
        "provider": raw["provider"],
        "ids": runs[0]["ids"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="ONNX model dir (repeatable)")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="intra/inter-op threads, both engines")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="alternating subprocess rounds")
    p.add_argument("--out", type=Path, default=Path("out/bench/generate.json"))
    p.add_argument("--plot", type=Path, default=None, help="also draw a PNG here")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = []
    steps = len(args.model) * args.rounds * len(ENGINES)
    done = 0
    for model in args.model:
        per: dict[str, list[dict]] = {e: [] for e in ENGINES}
        for _ in range(args.rounds):
            for engine in ENGINES:
                done += 1
                print(f"[{done}/{steps}] {engine} on {model} ...", file=sys.stderr, flush=True)
                per[engine].append(_spawn(engine, model, args))
        row = {"model": model, "threads": args.threads, "prompt": args.prompt,
               "max_new_tokens": args.max_new_tokens}
        for engine in ENGINES:
            merged = {"runs": [r for raw in per[engine] for r in raw["runs"]],
                      "peak_rss_mb": max(raw["peak_rss_mb"] for raw in per[engine]),
                      "load_s": statistics.median(raw["load_s"] for raw in per[engine]),
                      "provider": per[engine][0]["provider"]}
            row[engine] = summarise(merged)
        row["same_ids"] = row["edged"].pop("ids") == row["optimum"].pop("ids")
        row["ratio_tokens_per_s"] = row["edged"]["tokens_per_s"] / row["optimum"]["tokens_per_s"]
        row["ratio_ttft"] = row["optimum"]["ttft_ms"] / row["edged"]["ttft_ms"]
        row["ratio_tokens_per_s_best"] = (row["edged"]["tokens_per_s_best"]
                                          / row["optimum"]["tokens_per_s_best"])
        results.append(row)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"baseline": "optimum ORTModelForCausalLM.generate",
                                    "results": results}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
    return 0


def print_table(results: list[dict]) -> None:
    head = (f"{'model':<16} {'engine':<8} {'tokens':>6} {'TTFT ms':>9} {'decode tok/s':>13} "
            f"{'best tok/s':>11} {'peak RSS MB':>12} {'same ids':>8}")
    print(head)
    print("-" * len(head))
    for row in results:
        name = Path(row["model"]).resolve()
        label = name.parent.name if name.name == "onnx" else name.name
        for engine in ENGINES:
            r = row[engine]
            print(f"{label[:16]:<16} {engine:<8} {r['completion_tokens']:>6} "
                  f"{r['ttft_ms']:>9.2f} {r['tokens_per_s']:>13.1f} "
                  f"{r['tokens_per_s_best']:>11.1f} {r['peak_rss_mb']:>12.0f} "
                  f"{row['same_ids']!s:>8}")
        print(f"{'':<16} {'ratio':<8} {'':>6} {row['ratio_ttft']:>8.2f}x "
              f"{row['ratio_tokens_per_s']:>12.2f}x {row['ratio_tokens_per_s_best']:>10.2f}x"
              "   edged/optimum (TTFT: optimum/edged)")
    print("(medians over all runs; best = fastest run; the runs alternate between engines)")


def plot(results: list[dict], path: Path) -> None:
    """Ratios edged/optimum per model (1.0 = parity); models differ by orders of magnitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [Path(r["model"]).resolve().parent.name if Path(r["model"]).name == "onnx"
              else Path(r["model"]).name for r in results]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(results))
    series = (("ratio_tokens_per_s", "decode tokens/s, median"),
              ("ratio_tokens_per_s_best", "decode tokens/s, best run"),
              ("ratio_ttft", "time to first token (optimum/edged)"))
    for k, (key, label) in enumerate(series):
        ax.bar([i + 0.27 * k for i in x], [r[key] for r in results], width=0.27, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.27 for i in x], labels)
    ax.set_ylabel("edged / optimum (higher is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
