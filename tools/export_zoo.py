"""Export local Hugging Face causal LMs into an edged zoo (no hub access).

For each HF model directory: export with optimum (task text-generation-with-past), optionally
quantise the weights to int8 with onnxruntime's dynamic quantiser, smoke-test the result with
edged's own loader, then append a `[[models]]` entry to the zoo manifest (written atomically).
List the models cheapest first: the manifest order is the cost order.

    python tools/export_zoo.py ~/hf/Qwen2.5-0.5B-Instruct ~/hf/Qwen2.5-1.5B-Instruct \
        --out models/qwen --int8 --max-new-tokens 256
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


def export(hf_dir: Path, out: Path, *, opset: int | None, validate: bool) -> None:
    from optimum.exporters.onnx import main_export

    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir}: not a Hugging Face model directory (no config.json)")
    main_export(str(hf_dir), output=str(out), task="text-generation-with-past", opset=opset,
                do_validation=validate, local_files_only=True)
    for extra in ("chat_template.jinja", "generation_config.json"):  # keep what optimum skips
        if (hf_dir / extra).is_file() and not (out / extra).is_file():
            shutil.copy2(hf_dir / extra, out / extra)


def quantize_int8(out: Path) -> tuple[int, int]:
    """Replace model.onnx by a weight-only int8 version; return (bytes before, bytes after)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = out / "model.onnx"
    before = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    big = before > 1_800_000_000  # protobuf's 2 GB limit: keep weights in an external file
    tmp = out / "model.int8.onnx"
    quantize_dynamic(src, tmp, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, use_external_data_format=big)
    if big:  # re-save so the weights sit in model.onnx_data, where edged counts them
        import onnx

        graph = onnx.load(str(tmp))
        for f in out.glob("model*.onnx*"):
            f.unlink()
        onnx.save_model(graph, str(src), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx_data")
    else:
        for f in out.glob("model.onnx*"):
            f.unlink()
        tmp.rename(src)
    after = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    return before, after


def smoke_test(out: Path, prompt: str) -> dict:
    from edged.zoo import GenerationParams, load_model

    model = load_model(out)
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
    t = time.perf_counter()
    log(f"{name}: exporting {hf_dir} with optimum ...")
    export(hf_dir, out, opset=args.opset, validate=not args.no_validate)
    info: dict = {"name": name, "dir": str(out), "export_s": round(time.perf_counter() - t, 1)}
    if args.int8:
        log(f"{name}: quantising weights to int8 ...")
        before, after = quantize_int8(out)
        info["size_mb_fp"], info["size_mb_int8"] = before / 2**20, after / 2**20
    log(f"{name}: smoke test ...")
    info["smoke"] = smoke_test(out, args.smoke_prompt)
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
    p.add_argument("--int8", action="store_true", help="int8 weight-only quantisation")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--no-validate", action="store_true", help="skip optimum's output check")
    p.add_argument("--smoke-prompt", default="Hello")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="per-model default written to the manifest")
    p.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                   help="[zoo] providers of a new manifest")
    args = p.parse_args(argv)
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
