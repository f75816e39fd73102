"""Export local Hugging Face causal LMs into an edged zoo (no hub access).

For each HF model directory: export, quantise, smoke-test the result with edged's own loader,
then append a `[[models]]` entry to the zoo manifest (written atomically). List the models
cheapest first: the manifest order is the cost order.

    python tools/export_zoo.py ~/hf/Qwen2.5-0.5B-Instruct ~/hf/Qwen2.5-1.5B-Instruct \
        --out models/qwen --precision int4 --target cpu --max-new-tokens 256

Backends (`--backend`):
  genai    onnxruntime-genai's model builder: fused graphs (GroupQueryAttention with rotary
           inside, SkipSimplifiedLayerNormalization, MatMulNBits), KV cache as one buffer
           shared by past and present. ~10x fewer kernels per token than optimum's graph; the
           fast path. Needs `onnxruntime-genai` (and the transformers version its builder wants)
           at export time only: edged runs the result with onnxruntime alone.
  optimum  optimum's `text-generation-with-past` export (any architecture optimum knows),
           then onnxruntime's MatMulNBits quantiser for int8/int4, or an fp16 conversion.
  auto     genai when its builder imports, else optimum (the default).

Precisions: fp32; fp16 (for --target cuda); int8 / int4 = 8-bit / 4-bit weight-only
MatMulNBits, symmetric blocks of 32, int8 activations on CPU (accuracy level 4): correct on every
x86 and ARM CPU, see edged/zoo/quantize.py for why not MatMulInteger.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MANIFEST_HEAD = """# edged zoo manifest: models cheapest first (see docs/zoo.md)
[zoo]
providers = {providers}
allow_fallback = true
load = "lazy"
memory_cap_mb = 0
"""


class ExportError(Exception):
    """An export step failed; the message says which model and which step."""


def log(message: str) -> None:
    print(f"[export_zoo] {message}", file=sys.stderr, flush=True)


PRECISIONS = ("fp32", "fp16", "int8", "int4")
TARGETS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
HF_EXTRAS = ("chat_template.jinja", "generation_config.json", "config.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json")


def genai_available() -> bool:
    """Whether onnxruntime-genai's model builder imports (it pins a recent transformers)."""
    import subprocess

    probe = [sys.executable, "-c", "import onnxruntime_genai.models.builder"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def export(hf_dir: Path, out: Path, *, opset: int | None, validate: bool) -> None:
    """optimum's fp32 export (text-generation-with-past)."""
    from optimum.exporters.onnx import main_export

    main_export(str(hf_dir), output=str(out), task="text-generation-with-past", opset=opset,
                do_validation=validate, local_files_only=True)
    copy_hf_files(hf_dir, out)


def export_genai(hf_dir: Path, out: Path, *, precision: str, target: str) -> None:
    """onnxruntime-genai's model builder, run as a subprocess (its imports stay out of ours)."""
    import subprocess

    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(out), "-p", precision, "-e", target, "-c", str(out / ".cache")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out / ".cache", ignore_errors=True)
    if done.returncode != 0:
        raise ExportError(f"{hf_dir}: onnxruntime-genai's builder failed:\n"
                          f"{done.stderr[-3000:]}")
    copy_hf_files(hf_dir, out, overwrite=True)


def copy_hf_files(hf_dir: Path, out: Path, *, overwrite: bool = False) -> None:
    """config.json and the tokenizer/generation files edged reads, where the exporter skipped
    them (optimum drops chat_template.jinja and generation_config.json; the genai builder
    writes no config.json, and re-saves the tokenizer with its own transformers version, so
    the originals replace its copies)."""
    for extra in HF_EXTRAS:
        if (hf_dir / extra).is_file() and (overwrite or not (out / extra).is_file()):
            shutil.copy2(hf_dir / extra, out / extra)


def quantize(out: Path, precision: str) -> tuple[int, int]:
    """Replace out/model.onnx by its int8/int4 (MatMulNBits) or fp16 version; return (bytes
    before, bytes after)."""
    from edged.zoo import quantize as q

    src = out / "model.onnx"
    before = q.onnx_size(out)
    tmp = out / "model.q.onnx"
    if precision in ("int8", "int4"):
        q.quantize_weights(src, tmp, bits=8 if precision == "int8" else 4)
    elif precision == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=False)
        q.save(model, tmp)
    else:
        return before, before
    for f in out.glob("model.onnx*"):
        f.unlink()
    for f in out.glob("model.q.onnx*"):  # model.q.onnx(+_data) -> model.onnx(+_data)
        f.rename(out / f.name.replace("model.q.onnx", "model.onnx"))
    if (out / "model.onnx_data").is_file():  # the graph still names the old data file
        import onnx

        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = "model.onnx_data"
        onnx.save_model(model, str(out / "model.onnx"))
    return before, q.onnx_size(out)


def quantize_int8(out: Path) -> tuple[int, int]:
    """int8 weight-only MatMulNBits (kept for callers of the old name)."""
    return quantize(out, "int8")


def smoke_test(out: Path, prompt: str, providers: list[str] | None = None) -> dict:
    from edged.zoo import GenerationParams, load_model

    model = load_model(out, providers)
    result = model.generate(prompt, params=GenerationParams(max_new_tokens=8))
    if result.completion_tokens < 1:
        raise ExportError(f"{out}: smoke test produced no tokens")
    return {"text": result.text, "tokens_per_s": round(result.tokens_per_s, 1),
            "provider": result.provider, "context": model.context}


def append_to_manifest(manifest: Path, name: str, path: Path, *, providers: list[str],
                       max_new_tokens: int | None) -> None:
    """Append one [[models]] entry (temp file, fsync, rename); refuse duplicate names."""
    text = manifest.read_text(encoding="utf-8") if manifest.is_file() else \
        MANIFEST_HEAD.format(providers=json.dumps(providers))
    existing = tomllib.loads(text).get("models", [])
    if any(m.get("name") == name for m in existing):
        raise ExportError(f"{manifest}: already lists a model named {name!r}")
    try:
        rel = path.resolve().relative_to(manifest.parent.resolve())
    except ValueError:
        rel = path.resolve()
    block = f"\n[[models]]\nname = {json.dumps(name)}\npath = {json.dumps(rel.as_posix())}\n"
    if max_new_tokens:
        block += f"[models.generation]\nmax_new_tokens = {max_new_tokens}\n"
    text = text.rstrip("\n") + "\n" + block
    tomllib.loads(text)  # never write a manifest that does not parse
    manifest.parent.mkdir(parents=True, exist_ok=True)
    mode = manifest.stat().st_mode & 0o777 if manifest.is_file() else 0o644
    fd, tmp = tempfile.mkstemp(dir=manifest.parent, prefix=".zoo.toml.")
    os.fchmod(fd, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, manifest)


def export_one(hf_dir: Path, args: argparse.Namespace, name: str) -> dict:
    out = args.out / name
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty (remove it or pick --name)")
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    t = time.perf_counter()
    backend = args.backend
    if backend == "auto":
        backend = "genai" if genai_available() else "optimum"
    info: dict = {"name": name, "dir": str(out), "backend": backend,
                  "precision": args.precision, "target": args.target}
    if backend == "genai":
        log(f"{name}: building {args.precision} graph for {args.target} with onnxruntime-genai ...")
        export_genai(hf_dir, out, precision=args.precision, target=args.target)
    else:
        log(f"{name}: exporting {hf_dir} with optimum ...")
        export(hf_dir, out, opset=args.opset, validate=not args.no_validate)
        if args.precision != "fp32":
            log(f"{name}: converting weights to {args.precision} ...")
            before, _ = quantize(out, args.precision)
            info["size_mb_fp32"] = round(before / 2**20, 1)
    if not args.all_logits:
        from edged.zoo.quantize import last_token_logits

        info["last_token_logits"] = last_token_logits(out / "model.onnx", out / "model.onnx")
    info["export_s"] = round(time.perf_counter() - t, 1)
    from edged.zoo.quantize import onnx_size

    info["size_mb"] = round(onnx_size(out) / 2**20, 1)
    log(f"{name}: smoke test ...")
    smoke_providers = [TARGETS[args.target], "CPUExecutionProvider"]
    info["smoke"] = smoke_test(out, args.smoke_prompt, smoke_providers)
    append_to_manifest(args.manifest or args.out / "zoo.toml", name, out,
                       providers=args.providers, max_new_tokens=args.max_new_tokens)
    log(f"{name}: ok {info['smoke']}")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dirs", nargs="+", type=Path, help="local HF model dirs, cheapest first")
    p.add_argument("--out", type=Path, required=True, help="zoo folder (one sub-folder a model)")
    p.add_argument("--manifest", type=Path, default=None, help="default: OUT/zoo.toml")
    p.add_argument("--name", action="append", default=None,
                   help="model name, once per HF dir (default: the dir's name, lower case)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="weights: fp32, fp16 (CUDA), int8 or int4 (weight-only MatMulNBits)")
    p.add_argument("--target", choices=sorted(TARGETS), default="cpu",
                   help="execution provider the graph is built for")
    p.add_argument("--backend", choices=("auto", "genai", "optimum"), default="auto",
                   help="genai: fused graphs (onnxruntime-genai's builder); optimum: "
                        "optimum's export + onnxruntime quantisers; auto: genai if it imports")
    p.add_argument("--int8", action="store_true", help="same as --precision int8")
    p.add_argument("--all-logits", action="store_true",
                   help="keep logits for every prompt position (default: the graph returns the "
                        "last position's only, which is all edged reads; onnxruntime-genai "
                        "and optimum's generate need all of them)")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--no-validate", action="store_true", help="skip optimum's output check")
    p.add_argument("--smoke-prompt", default="Hello")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="per-model default written to the manifest")
    p.add_argument("--providers", nargs="+", default=None,
                   help="[zoo] providers of a new manifest (default: from --target)")
    args = p.parse_args(argv)
    if args.int8:
        args.precision = "int8"
    if args.providers is None:
        args.providers = [TARGETS[args.target], "CPUExecutionProvider"] \
            if args.target != "cpu" else ["CPUExecutionProvider"]
    names = args.name or [d.resolve().name.lower() for d in args.hf_dirs]
    if len(names) != len(args.hf_dirs):
        p.error("give --name once per HF directory")
    done = []
    for hf_dir, name in zip(args.hf_dirs, names, strict=True):
        try:
            done.append(export_one(hf_dir, args, name))
        except ExportError as exc:
            log(f"error: {exc}")
            return 1
    print(json.dumps(done, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
