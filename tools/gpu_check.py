"""Check edged's CUDA path on a GPU machine in a few minutes: one table and a JSON file.

    python tools/gpu_check.py --model /path/smollm2-int4-cuda --json gpu-check.json
    python tools/gpu_check.py --dry-run --json out.json      # CPU: what CI runs

Steps (each a row: ok / FAIL / skip, seconds, detail):
  runtime     onnxruntime packages installed (exactly one), providers available, CUDA there
  export      (--export-hf DIR) tools/export_zoo.py --target cuda on a Hugging Face dir
  stories260k greedy ids from BOS on CUDA == ../shared/models/stories260K/golden.json
  model:NAME  each --model dir loaded on CUDA (allow_fallback off): provider really CUDA, device
              id, teacher-forced greedy agreement (>= 0.8) with the golden ids beside the bench
              (SmolLM2 fp32) or with the same model on CPU, and the known risks of the CUDA
              path: KV cache on the device and allocated once (SharedRunner), TensorRT shape
              churn, prefill logits copied to the host
  bench:NAME  decode tokens/s and TTFT on CUDA (greedy, --new-tokens, 1 request at a time)
  energy      joules of a known load (generation for --energy-s seconds) through edged.energy's
              NVML meter against NVML's own counter read directly before and after (within 5%)

--dry-run runs every step on CPUExecutionProvider with a simulated NVML counter (a 100 W board
whose counter moves every 100 ms), so the script's own logic is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = ROOT.parent / "shared"
SMOLLM2_GOLDEN = ROOT / "tools" / "bench" / "smollm2_golden.json"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ENERGY_TOLERANCE = 0.05
# teacher-forced top-1 agreement with the fp32 golden ids: SmolLM2 int4 0.85, int8 0.97 on CPU;
# a broken CUDA path (wrong cache, wrong positions) gives ~0. stories260K is checked exactly.
MIN_AGREEMENT = 0.8


class Check:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def run(self, name: str, fn, *args, **kw) -> dict | None:
        t = time.perf_counter()
        row = {"step": name, "status": "ok", "detail": ""}
        result = None
        try:
            result = fn(*args, **kw)
            if isinstance(result, tuple):  # (status, detail, extra)
                row["status"], row["detail"] = result[0], result[1]
                row.update(result[2] if len(result) > 2 else {})
        except Exception as exc:  # a failed step is a row, the next steps still run
            row["status"], row["detail"] = "FAIL", f"{type(exc).__name__}: {exc}"
        row["seconds"] = round(time.perf_counter() - t, 2)
        self.rows.append(row)
        print(f"[gpu_check] {row['status']:4s} {name}: {row['detail']}", file=sys.stderr,
              flush=True)
        return row

    @property
    def failed(self) -> bool:
        return any(r["status"] == "FAIL" for r in self.rows)

    def table(self) -> str:
        lines = [f"{'step':22s} {'status':6s} {'s':>6s}  detail", "-" * 100]
        for r in self.rows:
            lines.append(f"{r['step']:22s} {r['status']:6s} {r['seconds']:6.1f}  {r['detail']}")
        return "\n".join(lines)


# -- steps ------------------------------------------------------------------------------------
def check_runtime(provider: str) -> tuple:
    import onnxruntime as ort

    from edged.zoo.model import runtime_conflict, runtime_packages

    packages = runtime_packages()
    available = ort.get_available_providers()
    extra = {"packages": packages, "available": available, "onnxruntime": ort.__version__,
             "python": platform.python_version()}
    conflict = runtime_conflict()
    if conflict:
        return "FAIL", conflict, extra
    if provider not in available:
        return "FAIL", f"{provider} not in {available} (packages {packages})", extra
    if provider == CUDA and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    return "ok", f"{packages} providers {available}", extra


def check_export(hf_dir: Path, out: Path, precision: str) -> tuple:
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_zoo", ROOT / "tools" / "export_zoo.py")
    export_zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_zoo)
    rc = export_zoo.main([str(hf_dir), "--out", str(out), "--name", "exported",
                          "--precision", precision, "--target", "cuda", "--no-validate"])
    if rc != 0:
        return "FAIL", f"export_zoo exited {rc}"
    return "ok", f"{precision} cuda graph in {out / 'exported'}", {"dir": str(out / "exported")}


def load(directory: Path, provider: str):
    from edged.zoo import load_model

    return load_model(directory, [provider, CPU], allow_fallback=(provider == CPU),
                      intra_op_threads=1 if provider == CPU else 0)


def check_stories(provider: str) -> tuple:
    from edged.zoo import GenerationParams

    path = SHARED / "models" / "stories260K"
    if not (path / "onnx" / "model.onnx").is_file():
        return "skip", f"{path} absent"
    golden = json.loads((path / "golden.json").read_text())
    model = load(path / "onnx", provider)
    result = model.generate("", params=GenerationParams(max_new_tokens=golden["max_new_tokens"]))
    ids = [*golden["prompt_ids"], *result.token_ids]
    same = ids == golden["greedy_ids"]
    return ("ok" if same else "FAIL",
            f"{result.provider}: {len(result.token_ids)} ids "
            f"{'== golden' if same else '!= golden ' + str(ids[:12])}",
            {"provider": result.provider})


def _golden_for(model) -> dict | None:
    if SMOLLM2_GOLDEN.is_file():
        golden = json.loads(SMOLLM2_GOLDEN.read_text())
        if golden.get("vocab_size") == model.spec.vocab_size:
            return golden
    return None


def check_model(directory: Path, provider: str, new_tokens: int, models: dict) -> tuple:
    import numpy as np

    import edged.zoo.generate as gen
    from edged.zoo import GenerationParams

    model = load(directory, provider)
    models[directory] = model
    if model.provider != provider:
        return "FAIL", f"asked {provider}, runs {model.provider}"
    golden = _golden_for(model)
    if golden:
        prompt_ids, ref, against = golden["prompt_ids"], golden["greedy_ids"], "golden"
        ref = ref[:new_tokens]
    else:
        prompt_ids = model.encode_prompt("Once upon a time")
        params = GenerationParams(max_new_tokens=_budget(model, prompt_ids, new_tokens))
        ref = gen.generate(load(directory, CPU), prompt_ids, params).token_ids
        against = "CPU"
    agree, prefix = gen.teacher_forced_agreement(model, prompt_ids, ref)
    ids = ref
    risks = {"device_id": model.device_id, "shared_kv": model.spec.shared_kv,
             "tensorrt": "TensorrtExecutionProvider" in model.session.get_providers()}
    runner = gen.make_runner(model, model.session, len(prompt_ids) + 8)
    logits = runner.prefill(prompt_ids)
    if isinstance(runner, gen.SharedRunner):
        where = {v.device_name() for v in runner.cache}
        before = [v.data_ptr() for v in runner.cache]
        for _ in range(4):
            logits = runner.step(int(np.argmax(logits)))
        risks["kv_device"] = sorted(where)
        risks["kv_allocated_once"] = before == [v.data_ptr() for v in runner.cache]
        risks["prefill_logits_to_host_mb"] = round(
            min(len(prompt_ids), gen.PREFILL_CHUNK) * model.spec.vocab_size
            * np.dtype(model.spec.logits_dtype).itemsize / 2**20, 2)
    else:
        risks["kv_allocated_once"] = False  # optimum graphs: a new present every token
    want_device = "cuda" if provider == CUDA else "cpu"
    bad = []
    if agree < MIN_AGREEMENT:
        bad.append(f"agreement {agree:.3f} with {against}")
    if model.spec.shared_kv and (risks.get("kv_device") != [want_device]
                                 or not risks["kv_allocated_once"]):
        bad.append(f"KV cache {risks.get('kv_device')} once={risks['kv_allocated_once']}")
    if risks["tensorrt"]:
        bad.append("TensorRT: no profile shapes are set, the engine may rebuild per length")
    kv = (f"KV on {','.join(risks['kv_device'])}, allocated once "
          f"{risks['kv_allocated_once']}" if model.spec.shared_kv else "KV per token (optimum)")
    detail = (f"{model.provider} dev {model.device_id}, agreement {agree:.3f} vs {against} "
              f"over {len(ids)} ids (same first {prefix}), {kv}")
    return ("FAIL" if bad else "ok", detail + ("; " + "; ".join(bad) if bad else ""),
            {"agreement": agree, "identical_prefix": prefix, "against": against,
             "risks": risks})


def _budget(model, prompt_ids: list[int], new_tokens: int) -> int:
    return max(1, min(new_tokens, model.context - len(prompt_ids)))


def check_bench(model, new_tokens: int, repeats: int) -> tuple:
    import statistics

    import edged.zoo.generate as gen
    from edged.zoo import GenerationParams

    golden = _golden_for(model)
    prompt_ids = golden["prompt_ids"] if golden else model.encode_prompt("Once upon a time")
    params = GenerationParams(max_new_tokens=_budget(model, prompt_ids, new_tokens))
    gen.generate(model, prompt_ids, GenerationParams(max_new_tokens=2))  # warm-up
    runs = [gen.generate(model, prompt_ids, params) for _ in range(repeats)]
    tps = statistics.median(r.tokens_per_s for r in runs)
    ttft = statistics.median(r.ttft_ms for r in runs)
    return ("ok", f"{tps:.1f} tok/s decode, TTFT {ttft:.1f} ms ({len(prompt_ids)} prompt ids, "
                  f"{runs[0].completion_tokens} new, median of {repeats})",
            {"tokens_per_s": tps, "ttft_ms": ttft, "prompt_tokens": len(prompt_ids)})


def fake_nvml(watts: float = 100.0) -> types.ModuleType:
    """A pynvml stand-in: one GPU drawing `watts`, energy counter (mJ) moving every 100 ms."""
    fake = types.ModuleType("pynvml")
    try:
        import pynvml as real

        for name in dir(real):
            if name.startswith(("NVMLError", "NVML_ERROR")):
                setattr(fake, name, getattr(real, name))
    except ImportError:
        class NVMLError(Exception):
            value = 0

        fake.NVMLError = NVMLError
        for i, name in enumerate(("NOT_SUPPORTED", "LIBRARY_NOT_FOUND", "DRIVER_NOT_LOADED",
                                  "NO_PERMISSION")):
            setattr(fake, f"NVML_ERROR_{name}", 100 + i)
    t0 = time.monotonic()
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: 1
    fake.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    fake.nvmlDeviceGetName = lambda h: "simulated 100 W GPU"
    fake.nvmlDeviceGetTotalEnergyConsumption = \
        lambda h: int(5e6 + watts * 1000 * ((time.monotonic() - t0) // 0.1) * 0.1)
    fake.nvmlDeviceGetPowerUsage = lambda h: int(watts * 1000)
    return fake


def check_energy(model, seconds: float, device_index: int, dry: bool) -> tuple:
    """edged.energy's NVML meter vs NVML's counter read directly, around the same load."""
    import edged.zoo.generate as gen
    from edged.zoo import GenerationParams

    if dry:
        sys.modules["pynvml"] = fake_nvml()
    try:
        import pynvml
    except ImportError:
        return "skip", "pynvml not installed (pip install nvidia-ml-py)"
    from edged.energy import NvmlConfig, NvmlMeter

    meter = NvmlMeter(NvmlConfig(gpu_indices=(device_index,)))
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        time.sleep(0.3)  # the sampler's first readings
        stop = threading.Event()
        tokens = 0

        def load() -> None:
            nonlocal tokens
            while not stop.is_set():
                if model is None:
                    time.sleep(0.01)
                    continue
                ids = model.encode_prompt("Once upon a time")
                params = GenerationParams(max_new_tokens=_budget(model, ids, 32))
                tokens += gen.generate(model, ids, params).completion_tokens

        direct0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        with meter.window() as window:
            worker = threading.Thread(target=load, daemon=True)
            worker.start()
            time.sleep(seconds)
            stop.set()
            worker.join()
        direct1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        record = window.record
    finally:
        meter.close()
        if dry:
            sys.modules.pop("pynvml", None)
    direct_j = (direct1 - direct0) / 1000.0
    ratio = record.joules / direct_j if direct_j > 0 else float("nan")
    ok = abs(ratio - 1.0) <= ENERGY_TOLERANCE
    return ("ok" if ok else "FAIL",
            f"edged {record.joules:.1f} J vs NVML counter {direct_j:.1f} J (ratio {ratio:.3f}) "
            f"over {record.window_s:.1f} s, {tokens} tokens, {record.method}"
            + (", simulated counter" if dry else ""),
            {"edged_j": record.joules, "direct_j": direct_j, "ratio": ratio,
             "window_s": record.window_s, "simulated": dry})


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", type=Path, default=[],
                   help="edged model dir to check and bench on CUDA (repeatable)")
    p.add_argument("--export-hf", type=Path, default=None,
                   help="HF dir to export for CUDA first (then checked like --model)")
    p.add_argument("--export-precision", default="fp16", choices=("fp16", "int4", "fp32"))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--energy-s", type=float, default=5.0)
    p.add_argument("--device-index", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU provider and a simulated NVML counter (for CI)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    provider = CPU if args.dry_run else CUDA
    t0 = time.perf_counter()
    check = Check()
    check.run("runtime", check_runtime, provider)
    models: dict = {}
    dirs = list(args.model)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        if args.export_hf:
            row = check.run("export", check_export, args.export_hf, Path(scratch),
                            args.export_precision)
            if row and row.get("dir"):
                dirs.append(Path(row["dir"]))
        check.run("stories260k", check_stories, provider)
        for d in dirs:
            check.run(f"model:{d.name}", check_model, d, provider, args.new_tokens, models)
        for d, model in models.items():
            check.run(f"bench:{d.name}", check_bench, model, args.new_tokens, args.repeats)
        first = next(iter(models.values()), None)
        check.run("energy", check_energy, first, args.energy_s, args.device_index, args.dry_run)
    total = time.perf_counter() - t0
    print(check.table())
    print(f"{'FAILED' if check.failed else 'passed'} in {total:.1f} s "
          f"({'dry run, ' if args.dry_run else ''}provider {provider})")
    if args.json:
        args.json.write_text(json.dumps({"provider": provider, "dry_run": args.dry_run,
                                         "seconds": round(total, 1), "failed": check.failed,
                                         "rows": check.rows}, indent=2, default=str))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
