"""Tiny random-init causal LMs (Llama, Qwen2, GPT-2) exported with optimum, built at test time.

Each model is built from a config with fixed seeds, saved with a byte-level BPE tokenizer trained
here (so no ../shared is needed), exported with `optimum.exporters.onnx.main_export` (task
text-generation-with-past) once per test session into pytest's base temp dir, and reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CORPUS = [
    "Once upon a time there was a little robot who liked to count: one, two, three.",
    "The quick brown fox jumps over the lazy dog. Café, naïve, déjà vu, über, smörgåsbord.",
    "日本語のテキストと中文文本 and emoji 🙂🚀 mixed with ASCII words.",
    "def add(a, b):\n    return a + b\n# numbers 0123456789 and symbols !?;:-_/",
] * 20
VOCAB = 320
ARCHS = ("llama", "qwen2", "gpt2")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _config(arch: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.3}
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, tie_word_embeddings=True, **common)
    return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)


def build_hf(arch: str, out: Path) -> Path:
    """Random-init tiny model + tokenizer saved as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = _tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(arch, tok.get_vocab_size()))
    model.eval()
    model.save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>") \
        .save_pretrained(out)
    return out


def export(hf_dir: Path, out: Path) -> Path:
    from optimum.exporters.onnx import main_export

    main_export(str(hf_dir), output=str(out), task="text-generation-with-past",
                do_validation=False, local_files_only=True)
    return out


def tiny_model(arch: str, base: Path) -> tuple[Path, Path]:
    """(hf_dir, onnx_dir) for `arch`, built once per session under `base`."""
    hf, onnx = base / f"tiny-{arch}-hf", base / f"tiny-{arch}-onnx"
    if not (onnx / "model.onnx").is_file():
        import torch

        torch.set_num_threads(1)
        build_hf(arch, hf)
        export(hf, onnx)
    return hf, onnx


# -- token-for-token parity with transformers greedy ----------------------------------------
PROMPTS = ["Once upon a time", "日本語 🙂 café", "def add(a, b):\n"]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edged.zoo import load_model

    hf, onnx = tiny_model(request.param, tmp_path_factory.getbasetemp())
    torch.set_num_threads(1)
    reference = AutoModelForCausalLM.from_pretrained(hf).eval()
    return reference, AutoTokenizer.from_pretrained(hf), load_model(onnx)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_ids_equal_transformers(pair, prompt: str) -> None:
    import torch

    from edged.zoo import GenerationParams

    reference, tokenizer, model = pair
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=40, pad_token_id=1)[0, ids.shape[1]:]
    result = model.generate(prompt, params=GenerationParams(max_new_tokens=40))
    assert result.prompt_ids == ids[0].tolist()
    assert result.token_ids == expected.tolist()
    assert result.completion_tokens == len(expected)
    assert result.finish_reason == ("eos" if expected[-1].item() == 1 else "length")


@pytest.mark.slow
def test_graph_layout_is_read_from_the_export(pair) -> None:
    reference, _, model = pair
    cfg = reference.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    assert len(model.spec.kv) == 2 * cfg.num_hidden_layers
    assert {s.shape for s in model.spec.kv} == {(1, kv_heads, 0, 8)}
    assert model.spec.vocab_size == cfg.vocab_size == model.tokenizer_vocab
    assert model.context == 128 and model.eos_token_ids == {1}
