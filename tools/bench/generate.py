"""Compare edged's generation with onnxruntime-genai, llama.cpp and optimum, in one run.

Every engine gets the same prompt token ids (not text: tokenisers differ), greedy, the same new
token budget and thread count, each run in its own subprocess (peak RSS per engine), rounds
alternating between the engines, one warm-up per subprocess, medians over all timed runs.
Reports TTFT, decode tokens/s (tokens after the first / time after the first), peak RSS, model
size on disk, and greedy agreement with a reference id list (the golden file's, else the first
entry's): the share of the first N positions with the same id, and how many leading ids are
identical. Engines whose package is not installed are skipped with a note. Prints one table,
then edged's ratio to each other engine's entry of the same label (and llama.cpp's of the same
bit width) round by round: median, min and max of the per-round ratios. Writes JSON, and a PNG
of decode tokens/s and TTFT with --plot.

    python tools/bench/generate.py --golden tools/bench/smollm2_golden.json --threads 1 \\
        --edged int4=zoo/smollm2-int4 --genai int4=zoo/smollm2-int4 \\
        --llamacpp q4_1=SmolLM2-135M-Instruct.Q4_1.gguf --plot docs/zoo-bench-generate.png
    python tools/bench/generate.py --model ../shared/models/stories260K/onnx   # edged vs optimum

Entries are `LABEL=PATH` (or a bare PATH, labelled by its directory). `--model DIR` is short
for `--edged DIR --optimum DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent.parent
ENGINES = ("edged", "genai", "llamacpp", "optimum")
THP = "glibc.malloc.hugetlb=1"  # transparent huge pages for malloc'd memory (glibc >= 2.35)
MODULES = {"edged": "onnxruntime", "genai": "onnxruntime_genai", "llamacpp": "llama_cpp",
           "optimum": "optimum.onnxruntime"}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _per_cpu_s(count: int, marks: list[float], end: float) -> float:
    """Decode tokens per second of this process's CPU time, from the first token's mark on: on
    a shared machine the work done, which other jobs do not stretch the way they stretch
    wall-clock time (every engine runs single-threaded here)."""
    if count < 2 or end <= marks[0]:
        return 0.0
    return (count - 1) / (end - marks[0])


def _timed(fn, repeats: int) -> list[dict]:
    return [fn() for _ in range(repeats + 1)][1:]  # the first is the warm-up


def run_edged(path: str, ids: list[int], n: int, threads: int, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from edged.zoo import GenerationParams, load_model
    from edged.zoo.generate import generate

    t = time.perf_counter()
    model = load_model(path, intra_op_threads=threads, inter_op_threads=threads)
    load_s = time.perf_counter() - t
    params = GenerationParams(max_new_tokens=n)

    def one() -> dict:
        marks: list[float] = []  # CPU time at each text delta; the first follows token 1
        r = generate(model, ids, params, on_delta=lambda _: marks.append(time.process_time()))
        end = time.process_time()
        return {"ttft_ms": r.ttft_ms, "tokens_per_s": r.tokens_per_s, "ids": r.token_ids,
                "cpu_tokens_per_s": _per_cpu_s(r.completion_tokens, marks, end)}

    return {"load_s": load_s, "runs": _timed(one, repeats), "provider": model.provider}


def run_genai(path: str, ids: list[int], n: int, threads: int, repeats: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    with tempfile.TemporaryDirectory() as tmp:  # same files, genai_config with our threads
        for f in Path(path).iterdir():
            os.symlink(f.resolve(), Path(tmp) / f.name)
        cfg = json.loads((Path(path) / "genai_config.json").read_text())
        options = cfg["model"]["decoder"].setdefault("session_options", {})
        if threads:
            options.update(intra_op_num_threads=threads, inter_op_num_threads=threads)
        (Path(tmp) / "genai_config.json").unlink()
        (Path(tmp) / "genai_config.json").write_text(json.dumps(cfg))
        t = time.perf_counter()
        model = og.Model(tmp)
        load_s = time.perf_counter() - t
    prompt = np.asarray(ids, dtype=np.int32)

    def one() -> dict:
        t0 = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        out, first = [], None
        while not gen.is_done() and len(out) < n:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            if first is None:
                first, cpu0 = time.perf_counter(), time.process_time()
        end = time.perf_counter()
        return {"ttft_ms": (first - t0) * 1e3, "ids": out,
                "tokens_per_s": (len(out) - 1) / (end - first) if len(out) > 1 else 0.0,
                "cpu_tokens_per_s": _per_cpu_s(len(out), [cpu0], time.process_time())}

    return {"load_s": load_s, "runs": _timed(one, repeats), "provider": "genai-cpu"}


def run_llamacpp(path: str, ids: list[int], n: int, threads: int, repeats: int) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:  # llama-cpp-cffi: the C API through cffi
        return run_llamacpp_cffi(path, ids, n, threads, repeats)

    t = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=len(ids) + n + 8, n_threads=threads or None,
                n_threads_batch=threads or None, verbose=False)
    load_s = time.perf_counter() - t

    def one() -> dict:
        llm.reset()
        t0 = time.perf_counter()
        out, first = [], None
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(int(token))
            if first is None:
                first, cpu0 = time.perf_counter(), time.process_time()
            if len(out) >= n:
                break
        end = time.perf_counter()
        return {"ttft_ms": (first - t0) * 1e3, "ids": out,
                "tokens_per_s": (len(out) - 1) / (end - first) if len(out) > 1 else 0.0,
                "cpu_tokens_per_s": _per_cpu_s(len(out), [cpu0], time.process_time())}

    return {"load_s": load_s, "runs": _timed(one, repeats), "provider": "llama.cpp"}


def run_llamacpp_cffi(path: str, ids: list[int], n: int, threads: int, repeats: int) -> dict:
    """llama.cpp's own C API (package llama-cpp-cffi, module `llama`): batch the prompt, then one
    llama_decode per token, llama.cpp's greedy sampler."""
    from llama._llama_cpp_cpu import ffi, lib

    lib.llama_backend_init()
    t = time.perf_counter()
    model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
    cp = lib.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = len(ids) + n + 8
    if threads:
        cp.n_threads = cp.n_threads_batch = threads
    ctx = lib.llama_init_from_model(model, cp)
    sampler = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(sampler, lib.llama_sampler_init_greedy())
    load_s = time.perf_counter() - t
    prompt = ffi.new("llama_token[]", ids)
    one_token = ffi.new("llama_token[1]")

    def one() -> dict:
        lib.llama_kv_self_clear(ctx)
        t0 = time.perf_counter()
        if lib.llama_decode(ctx, lib.llama_batch_get_one(prompt, len(ids))) != 0:
            raise RuntimeError("llama_decode failed on the prompt")
        out = [int(lib.llama_sampler_sample(sampler, ctx, -1))]
        first, cpu0 = time.perf_counter(), time.process_time()
        while len(out) < n:
            one_token[0] = out[-1]
            if lib.llama_decode(ctx, lib.llama_batch_get_one(one_token, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            out.append(int(lib.llama_sampler_sample(sampler, ctx, -1)))
        end = time.perf_counter()
        return {"ttft_ms": (first - t0) * 1e3, "ids": out,
                "tokens_per_s": (len(out) - 1) / (end - first) if len(out) > 1 else 0.0,
                "cpu_tokens_per_s": _per_cpu_s(len(out), [cpu0], time.process_time())}

    return {"load_s": load_s, "runs": _timed(one, repeats), "provider": "llama.cpp (cffi)"}


def run_optimum(path: str, ids: list[int], n: int, threads: int, repeats: int) -> dict:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
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
    model = ORTModelForCausalLM.from_pretrained(path, session_options=so,
                                                provider="CPUExecutionProvider")
    load_s = time.perf_counter() - t
    prompt = torch.tensor([ids])
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    def one() -> dict:
        clock = Clock()
        t0 = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             do_sample=False, streamer=clock, pad_token_id=pad)
        end = time.perf_counter()
        new = out[0, len(ids):].tolist()
        first = clock.stamps[1]
        return {"ttft_ms": (first - t0) * 1e3, "ids": new,
                "tokens_per_s": (len(new) - 1) / (end - first) if len(new) > 1 else 0.0}

    return {"load_s": load_s, "runs": _timed(one, repeats), "provider": model.providers[0]}


RUNNERS = {"edged": run_edged, "genai": run_genai, "llamacpp": run_llamacpp,
           "optimum": run_optimum}


def worker(args: argparse.Namespace) -> None:
    spec = json.loads(args.worker)
    out = RUNNERS[spec["engine"]](spec["path"], spec["ids"], spec["n"], spec["threads"],
                                  spec["repeats"])
    out["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(out))


def available(engine: str) -> str | None:
    """None when the engine's package imports in a subprocess like the worker's, else why not."""
    module = MODULES[engine]
    if engine == "llamacpp":  # llama-cpp-python, else llama-cpp-cffi's CPU build
        module = "llama_cpp" if _imports("llama_cpp") else "llama._llama_cpp_cpu"
    probe = [sys.executable, "-c", f"import {module}"]
    done = subprocess.run(probe, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["?"])[-1]
    return f"{module} does not import ({last[:120]})"


def _imports(module: str) -> bool:
    probe = [sys.executable, "-c", f"import {module}"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def size_mb(path: str) -> float:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size / 2**20
    return sum(f.stat().st_size for f in p.iterdir()
               if f.is_file() and f.name.startswith(("model.onnx", "decoder_model"))) / 2**20


def _spawn(entry: dict, ids: list[int], args: argparse.Namespace) -> dict:
    spec = {"engine": entry["engine"], "path": entry["path"], "ids": ids,
            "n": args.max_new_tokens, "threads": args.threads, "repeats": args.repeats}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if args.thp:  # every engine alike: glibc's malloc asks for transparent huge pages
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), THP]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-1500:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(ids: list[int], ref: list[int]) -> tuple[float, int]:
    n = min(len(ids), len(ref))
    same = sum(a == b for a, b in zip(ids[:n], ref[:n], strict=True))
    prefix = next((i for i in range(n) if ids[i] != ref[i]), n)
    return same / max(1, len(ref)), prefix


def parse_entries(args: argparse.Namespace) -> list[dict]:
    entries = []
    for model in args.model or []:
        args.edged = [*(args.edged or []), model]
        args.optimum = [*(args.optimum or []), model]
    for engine in ENGINES:
        for item in getattr(args, engine) or []:
            label, _, path = item.rpartition("=") if "=" in item else ("", "", item)
            if not label:
                p = Path(path).resolve()
                label = p.parent.name if p.name == "onnx" else p.stem
            entries.append({"engine": engine, "label": label, "path": path})
    return entries


def prompt_ids(args: argparse.Namespace, entries: list[dict]) -> tuple[list[int], list | None]:
    if args.golden:
        golden = json.loads(args.golden.read_text())
        return golden["prompt_ids"], golden.get("greedy_ids")
    sys.path.insert(0, str(ROOT))
    from edged.zoo import load_model

    first = next((e for e in entries if e["engine"] in ("edged", "optimum")), None)
    if first is None:
        raise SystemExit("give --golden (prompt ids) or an edged/optimum model to tokenise with")
    return load_model(first["path"]).encode_prompt(args.prompt), None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for engine in ENGINES:
        p.add_argument(f"--{engine}", action="append", metavar="[LABEL=]PATH",
                       help=f"a model for {engine} (repeatable)")
    p.add_argument("--model", action="append", help="short for --edged DIR --optimum DIR")
    p.add_argument("--golden", type=Path, default=None,
                   help="JSON with prompt_ids (and greedy_ids: the agreement reference)")
    p.add_argument("--prompt", default="Once upon a time", help="without --golden")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="intra/inter-op threads, all engines")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternating subprocess rounds")
    p.add_argument("--thp", action="store_true",
                   help=f"run every engine with GLIBC_TUNABLES={THP}: weights in transparent "
                        "huge pages (fewer TLB misses while streaming them each token)")
    p.add_argument("--out", type=Path, default=Path("out/bench/generate.json"))
    p.add_argument("--plot", type=Path, default=None, help="also draw a PNG here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    entries = parse_entries(args)
    if not entries:
        p.error("name at least one model")
    notes = []
    for engine in {e["engine"] for e in entries}:
        why = available(engine)
        if why:
            notes.append(f"{engine} skipped: {why}")
            entries = [e for e in entries if e["engine"] != engine]
    ids, reference = prompt_ids(args, entries)
    per: dict[int, list[dict]] = {i: [] for i in range(len(entries))}
    steps, done = args.rounds * len(entries), 0
    for _ in range(args.rounds):
        for i, entry in enumerate(entries):
            done += 1
            print(f"[{done}/{steps}] {entry['engine']} {entry['label']} ...", file=sys.stderr,
                  flush=True)
            try:
                per[i].append(_spawn(entry, ids, args))
            except RuntimeError as exc:
                notes.append(f"{entry['engine']} {entry['label']} failed: {exc}")
                entry["failed"] = True
    rows = []
    for i, entry in enumerate(entries):
        if entry.get("failed") or not per[i]:
            continue
        runs = [r for raw in per[i] for r in raw["runs"]]
        row = {**entry, "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
               "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
               "tokens_per_s_best": max(r["tokens_per_s"] for r in runs),
               "cpu_tokens_per_s": statistics.median(r.get("cpu_tokens_per_s", 0.0)
                                                     for r in runs),
               "runs": len(runs), "completion_tokens": len(runs[0]["ids"]),
               "peak_rss_mb": max(raw["peak_rss_mb"] for raw in per[i]),
               "load_s": statistics.median(raw["load_s"] for raw in per[i]),
               "provider": per[i][0]["provider"], "size_mb": size_mb(entry["path"]),
               "ids": runs[0]["ids"],
               "deterministic": all(r["ids"] == runs[0]["ids"] for r in runs)}
        rows.append(row)
    ref = reference or (rows[0]["ids"] if rows else [])
    for row in rows:
        row["agreement"], row["same_prefix"] = agreement(row["ids"], ref)
    ratios = paired_ratios(entries, per)
    print_table(rows, reference is not None, notes)
    print_ratios(ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "prompt_tokens": len(ids), "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
        "glibc_tunables": THP if args.thp else None,
        "reference": "golden greedy_ids" if reference else "first row's ids",
        "notes": notes, "results": rows, "ratios": ratios}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    if args.plot and rows:
        plot(rows, args.plot)
    return 0


def _digits(label: str) -> str:
    return "".join(c for c in label if c.isdigit())[:1]


def paired_ratios(entries: list[dict], per: dict[int, list[dict]]) -> list[dict]:
    """edged against every other engine's entry of the same label (and llama.cpp's entries of
    the same bit width: int4 vs q4_1), round by round: each round's medians divided, so a slow
    stretch of a shared machine hits both sides of a ratio. Median, min and max over rounds."""
    def round_median(raw: dict, key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in raw["runs"])

    out = []
    for i, e in enumerate(entries):
        if e["engine"] != "edged" or e.get("failed"):
            continue
        for j, o in enumerate(entries):
            if o["engine"] == "edged" or o.get("failed"):
                continue
            same = o["label"] == e["label"] or (o["engine"] == "llamacpp"
                                                and _digits(o["label"]) == _digits(e["label"]))
            if not same:
                continue
            rounds = list(zip(per[i], per[j], strict=False))
            if not rounds:
                continue
            row = {"edged": e["label"], "other": f"{o['engine']} {o['label']}",
                   "rounds": len(rounds)}
            for key in ("tokens_per_s", "cpu_tokens_per_s", "ttft_ms"):
                vals = [round_median(a, key) / round_median(b, key) for a, b in rounds
                        if round_median(b, key) > 0]
                if vals:
                    row[key] = {"median": statistics.median(vals), "min": min(vals),
                                "max": max(vals), "per_round": vals}
            row["peak_rss"] = (max(a["peak_rss_mb"] for a, _ in rounds)
                               / max(b["peak_rss_mb"] for _, b in rounds))
            out.append(row)
    return out


def print_ratios(ratios: list[dict]) -> None:
    if not ratios:
        return
    print("edged / other, per round (rounds paired; median [min, max]):")
    for r in ratios:
        parts = [f"{name} {r[key]['median']:.3f} [{r[key]['min']:.3f}, {r[key]['max']:.3f}]"
                 for key, name in (("tokens_per_s", "decode"), ("cpu_tokens_per_s", "tok/CPU-s"),
                                   ("ttft_ms", "TTFT")) if key in r]
        print(f"  edged {r['edged']:<6} / {r['other']:<16} " + ", ".join(parts)
              + f", peak RSS {r['peak_rss']:.2f}")


def print_table(rows: list[dict], golden: bool, notes: list[str]) -> None:
    head = (f"{'engine':<9} {'model':<14} {'tok':>4} {'TTFT ms':>8} {'decode tok/s':>13} "
            f"{'best':>7} {'tok/CPU-s':>9} {'RSS MB':>7} {'size MB':>8} {'agree':>6} "
            f"{'same 1st':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['engine']:<9} {r['label'][:14]:<14} {r['completion_tokens']:>4} "
              f"{r['ttft_ms']:>8.1f} {r['tokens_per_s']:>13.1f} {r['tokens_per_s_best']:>7.1f} "
              f"{r['cpu_tokens_per_s']:>9.1f} {r['peak_rss_mb']:>7.0f} {r['size_mb']:>8.1f} "
              f"{r['agreement']:>6.3f} {r['same_prefix']:>8}")
    print(f"(medians over all runs, rounds alternate between engines; agree = share of the "
          f"first N ids equal to {'the golden ids' if golden else 'the first row'}, "
          "same 1st = identical leading ids)")
    for note in notes:
        print(f"note: {note}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['engine']}\n{r['label']}" for r in rows]
    colors = {"edged": "tab:blue", "genai": "tab:orange", "llamacpp": "tab:green",
              "optimum": "tab:gray"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(rows))
    a.bar(x, [r["tokens_per_s"] for r in rows], color=[colors[r["engine"]] for r in rows])
    a.set_ylabel("decode tokens/s (median)")
    b.bar(x, [r["ttft_ms"] for r in rows], color=[colors[r["engine"]] for r in rows])
    b.set_ylabel("time to first token, ms (median)")
    for ax in (a, b):
        ax.set_xticks(list(x), labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
