"""Sentence encoder for the satisfaction predictor: an ONNX BERT-style model, no torch at runtime.

An encoder directory (written by `tools/export_encoder.py`) holds:

    model.onnx      inputs input_ids, attention_mask (token_type_ids optional);
                    first output: token embeddings (batch, seq, dim)
    tokenizer.json  a `tokenizers` tokenizer (its own padding/truncation settings are ignored)
    encoder.json    {"pooling": "mean", "normalize": true, "max_length": 256, "dim": 384,
                     "source": "...", ...}

`SentenceEncoder.encode` reproduces sentence-transformers' mean pooling + L2 normalisation:
truncate to `max_length` tokens, average the token embeddings over the attention mask, divide by
the L2 norm. A directory that is wrong in any way raises `EncoderError` naming the file and what
is wrong; there is no fallback, so a misconfigured router fails at start instead of predicting
from garbage features.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "encoder.json"
REQUIRED_FILES = (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE)
FINGERPRINT_FILES = (MODEL_FILE, "model.onnx_data", TOKENIZER_FILE, CONFIG_FILE)
REQUIRED_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class EncoderError(ValueError):
    """The encoder directory, its files or the texts given are unusable; the message says where."""


def fingerprint_dir(path: Path) -> str:
    """sha256 (hex) over the files that define the encoder's output, name- and size-prefixed.

    Caches of embeddings and router state key on it, so any change of weights, tokenizer or
    pooling settings invalidates them.
    """
    h = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        file = path / name
        if not file.is_file():
            continue
        h.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _read_config(file: Path) -> dict[str, Any]:
    """encoder.json, checked field by field (an unknown pooling is refused, not guessed)."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderError(f"{file}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise EncoderError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("pooling") != "mean":
        raise EncoderError(f"{file}: pooling must be \"mean\", got {config.get('pooling')!r}")
    if not isinstance(config.get("normalize"), bool):
        raise EncoderError(f"{file}: normalize must be true or false, "
                           f"got {config.get('normalize')!r}")
    for key in ("max_length", "dim"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EncoderError(f"{file}: {key} must be a positive integer, got {value!r}")
    if config["max_length"] < 2:
        raise EncoderError(f"{file}: max_length {config['max_length']} leaves no room for text")
    return config


class SentenceEncoder:
    """Texts -> (n, dim) float32 embeddings with sentence-transformers' mean-pool semantics.

    `threads` is onnxruntime's intra-op thread count (0 = onnxruntime's default); the router
    encodes one short request at a time, where one thread is both fastest per joule and leaves
    the other cores to the LLMs.
    """

    def __init__(self, path: str | Path, *, threads: int = 1) -> None:
        self.path = Path(path)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise EncoderError(f"{self.path}: threads must be an integer >= 0, got {threads!r}")
        if not self.path.exists():
            raise EncoderError(f"{self.path}: encoder directory does not exist")
        if not self.path.is_dir():
            raise EncoderError(f"{self.path}: not a directory (expected an encoder directory)")
        missing = [name for name in REQUIRED_FILES if not (self.path / name).is_file()]
        if missing:
            raise EncoderError(f"{self.path}: missing {', '.join(missing)} "
                               f"(an encoder directory holds {', '.join(REQUIRED_FILES)}; "
                               "make one with tools/export_encoder.py)")
        self.config = _read_config(self.path / CONFIG_FILE)
        self.dim: int = self.config["dim"]
        self.max_length: int = self.config["max_length"]
        self.normalize: bool = self.config["normalize"]
        self.source: str = str(self.config.get("source", self.path.name))
        self._tokenizer = self._load_tokenizer(self.path / TOKENIZER_FILE)
        self._session, self._feeds = self._load_session(self.path / MODEL_FILE, threads)
        self.fingerprint: str = fingerprint_dir(self.path)

    def __repr__(self) -> str:
        return (f"SentenceEncoder({str(self.path)!r}, source={self.source!r}, dim={self.dim}, "
                f"max_length={self.max_length})")

    def _load_tokenizer(self, file: Path) -> Any:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise EncoderError(f"{file}: not a loadable tokenizers file ({exc})") from exc
        # the file's own settings (all-MiniLM ships truncation 128, fixed padding 128) differ
        # from sentence-transformers' max_seq_length: the encoder's config decides
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_length)
        return tokenizer

    def _load_session(self, file: Path, threads: int) -> tuple[Any, dict[str, Any]]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(file), sess_options=options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's errors share no public base class
            raise EncoderError(f"{file}: not a loadable ONNX model ({exc})") from exc
        inputs = {i.name: i for i in session.get_inputs()}
        missing = [name for name in REQUIRED_INPUTS if name not in inputs]
        unknown = [name for name in inputs if name not in REQUIRED_INPUTS + OPTIONAL_INPUTS]
        if missing or unknown:
            raise EncoderError(f"{file}: model inputs are {sorted(inputs)}; need "
                               f"{list(REQUIRED_INPUTS)} (+ optional {list(OPTIONAL_INPUTS)})")
        feeds = {}
        for name, info in inputs.items():
            if info.type not in _INT_TYPES:
                raise EncoderError(f"{file}: input {name} is {info.type}, expected int64 or int32")
            feeds[name] = _INT_TYPES[info.type]
        out = session.get_outputs()[0]
        shape = out.shape
        if len(shape) != 3:
            raise EncoderError(f"{file}: first output {out.name} has shape {shape}; expected "
                               "token embeddings (batch, sequence, dim)")
        if isinstance(shape[2], int) and shape[2] != self.dim:
            raise EncoderError(f"{file}: output dim {shape[2]} differs from "
                               f"{self.path / CONFIG_FILE} dim {self.dim}")
        return session, feeds

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """(len(texts), dim) float32, each row L2-normalised (when the config says normalize).

        Texts are sorted by token count and batched, so padding stays short; the mask keeps pad
        tokens out of the mean, so a text's embedding does not depend on its batch mates.
        """
        if isinstance(texts, str):
            raise EncoderError("encode takes a sequence of texts, not one str (wrap it in a list)")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise EncoderError(f"texts[{i}] is {type(text).__name__}, not str")
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        result = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return result
        encodings = self._tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            result[chunk] = self._run([encodings[i] for i in chunk])
        return result

    def _run(self, encodings: list[Any]) -> np.ndarray:
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), length), dtype=np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n], types[row, :n], mask[row, :n] = e.ids, e.type_ids, 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feed = {name: arrays[name].astype(dtype, copy=False) for name, dtype in self._feeds.items()}
        tokens = self._session.run(None, feed)[0]
        if tokens.ndim != 3 or tokens.shape[:2] != ids.shape or tokens.shape[2] != self.dim:
            raise EncoderError(f"{self.path / MODEL_FILE}: output shape {tokens.shape}, expected "
                               f"({ids.shape[0]}, {ids.shape[1]}, {self.dim})")
        weights = mask.astype(np.float32)[:, :, None]
        summed = (tokens.astype(np.float32) * weights).sum(axis=1)
        pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)  # sentence-transformers' clamp
        if self.normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

