"""Precompute the sentence embeddings of MESS+ traces once, into edged's embedding cache.

Each trace's `input_text` column (file order) is embedded with the given encoder directory and
stored by `edged.replay.embeddings.embed_texts` (key: encoder fingerprint + texts hash), so replays
and reports load them instead of re-encoding. Prints one line per trace: rows, cache file, seconds.

    python tools/embed_traces.py ~/encoders/minilm-int8 ../shared/data/messplus [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_REPO_ROOT = Path(__file__).resolve().parent.parent  # this checkout's edged, not an installed one
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from edged.replay.embeddings import cache_path, default_cache_dir, embed_texts  # noqa: E402
from edged.replay.trace import TraceError, find_traces, load_trace  # noqa: E402
from edged.router.encoder import EncoderError, SentenceEncoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("encoder", type=Path, help="encoder directory (tools/export_encoder.py)")
    p.add_argument("traces", nargs="+", help="trace CSVs or folders of them")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = default)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"default: {default_cache_dir()}")
    args = p.parse_args(argv)
    try:
        encoder = SentenceEncoder(args.encoder, threads=args.threads)
        files = find_traces(args.traces)
    except (EncoderError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"encoder {encoder.source} ({encoder.config.get('variant', '?')}), "
          f"fingerprint {encoder.fingerprint[:16]}", file=sys.stderr)
    done, start = [], time.perf_counter()
    for file in files:
        try:
            trace = load_trace(file)
        except TraceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        t = time.perf_counter()

        def progress(n: int, total: int, name: str = trace.benchmark) -> None:
            print(f"\r  {name}: {n}/{total}", end="", file=sys.stderr, flush=True)

        rows = embed_texts(encoder, trace.texts, args.cache_dir, progress=progress)
        seconds = time.perf_counter() - t
        path = cache_path(encoder, trace.texts, args.cache_dir)
        print(f"\r{trace.benchmark:24} {rows.shape[0]:6d} rows {seconds:7.1f} s  {path}",
              file=sys.stderr)
        done.append({"trace": str(file), "rows": rows.shape[0], "seconds": round(seconds, 1),
                     "cache": str(path)})
    print(json.dumps({"encoder": str(args.encoder), "fingerprint": encoder.fingerprint,
                      "total_s": round(time.perf_counter() - start, 1), "traces": done},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
