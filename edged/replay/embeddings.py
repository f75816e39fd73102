"""Embeddings of a trace's texts, computed once per encoder and cached outside the repository.

Replaying 11k MESS+ requests re-embeds the same texts on every run, seed and ablation; at a few
ms a text that dominates a replay. `embed_texts` stores the matrix as one `.npy` file named by

    <encoder fingerprint, 16 hex>-<sha256 of the texts, 24 hex>-<count>.npy

under `cache_dir` (default `$XDG_CACHE_HOME/edged/embeddings`, else `~/.cache/edged/embeddings`),
so a changed encoder (weights, tokenizer, pooling) or a changed text list never reads stale rows.
Files are written to a temporary name and renamed; a file that does not load or has the wrong
shape is recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

Progress = Callable[[int, int], None]
CHUNK = 256  # texts per encode call: progress granularity, bounded padding memory


class TextEncoder(Protocol):
    """What `embed_texts` needs of an encoder (`edged.router.encoder.SentenceEncoder` fits)."""

    fingerprint: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/edged/embeddings`, else `~/.cache/edged/embeddings`."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edged" / "embeddings"


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 (hex) of the texts in order, each length-prefixed (so ["ab"] != ["a", "b"])."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def cache_path(encoder: TextEncoder, texts: Sequence[str], cache_dir: Path | None = None) -> Path:
    """Where `embed_texts` keeps the embeddings of `texts` under `encoder`."""
    base = default_cache_dir() if cache_dir is None else Path(cache_dir)
    return base / f"{encoder.fingerprint[:16]}-{texts_digest(texts)[:24]}-{len(texts)}.npy"


def _load(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached matrix, or None when absent or unusable (then the caller recomputes)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        warnings.warn(f"{path}: unreadable embedding cache, recomputing ({exc})", stacklevel=3)
        return None
    if array.shape != shape or array.dtype != np.float32 or not np.isfinite(array).all():
        warnings.warn(f"{path}: embedding cache holds {array.dtype}{array.shape}, expected "
                      f"float32{shape}; recomputing", stacklevel=3)
        return None
    return array


def _save(path: Path, array: np.ndarray) -> None:
    """Temp file in the same directory, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def embed_texts(encoder: TextEncoder, texts: Sequence[str], cache_dir: Path | None = None,
                progress: Progress | None = None) -> np.ndarray:
    """(len(texts), encoder.dim) float32 embeddings, from the cache when it holds them.

    Duplicate texts are encoded once. `progress(done, total)` is called after each chunk of
    unique texts (and once with total/total on a cache hit). An unwritable cache directory only
    warns: the embeddings are still returned.
    """
    texts = list(texts)
    path = cache_path(encoder, texts, cache_dir)
    shape = (len(texts), encoder.dim)
    cached = _load(path, shape)
    if cached is not None:
        if progress is not None:
            progress(len(texts), len(texts))
        return cached
    unique = list(dict.fromkeys(texts))
    rows = np.zeros((len(unique), encoder.dim), dtype=np.float32)
    for start in range(0, len(unique), CHUNK):
        chunk = unique[start:start + CHUNK]
        out = np.asarray(encoder.encode(chunk), dtype=np.float32)
        if out.shape != (len(chunk), encoder.dim):
            raise ValueError(f"encoder {encoder.fingerprint[:16]} returned shape {out.shape} for "
                             f"{len(chunk)} texts, expected ({len(chunk)}, {encoder.dim})")
        rows[start:start + len(chunk)] = out
        if progress is not None:
            progress(start + len(chunk), len(unique))
    index = {text: i for i, text in enumerate(unique)}
    result = rows[[index[text] for text in texts]] if texts else rows
    try:
        _save(path, result)
    except OSError as exc:
        warnings.warn(f"{path}: could not write embedding cache ({exc})", stacklevel=2)
    return result
