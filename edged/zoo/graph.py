"""The decoder graph as onnxruntime sees it: names, dtypes and the KV-cache layout.

Read from the session's inputs and outputs, never guessed from the architecture name, so any
optimum `text-generation-with-past` export (`past_key_values.N.key/value` -> `present.N.key/value`,
whichever of attention_mask / position_ids / token_type_ids / use_cache_branch it has) and
onnxruntime-genai's fused graphs (GroupQueryAttention, MatMulNBits; past and present may share
one pre-allocated buffer) load alike. Imports nothing else of edged but its errors, so both the
model (`edged.zoo.model`) and the loop (`edged.zoo.generate`) can depend on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from edged.zoo.errors import ModelLoadError

_KNOWN_INPUTS = {"input_ids", "attention_mask", "position_ids", "token_type_ids",
                 "use_cache_branch"}
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(double)": np.float64, "tensor(bfloat16)": None,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
GPU_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


@dataclass(frozen=True)
class KVSlot:
    """One cache tensor: fed as `past`, returned as `present`."""

    past: str
    present: str
    dtype: type
    shape: tuple[int, ...]  # with 0 on the sequence axis: the empty cache of the first step


@dataclass(frozen=True)
class GraphSpec:
    """What the decoder graph takes and returns."""

    input_ids_dtype: type
    mask_dtype: type | None
    position_dtype: type | None
    token_type_dtype: type | None
    use_cache_branch: bool
    logits: str
    vocab_size: int
    logits_dtype: type
    kv: tuple[KVSlot, ...]
    # the graph returns the last position's logits only (edged's exports: prefill skips the
    # (prompt x vocab) lm_head product it never reads)
    logits_last_only: bool = False
    # past and present may be one pre-allocated (batch, heads, max_len, head_dim) buffer that the
    # graph writes in place (GroupQueryAttention reads the length from attention_mask)
    shared_kv: bool = False

    @property
    def output_names(self) -> list[str]:
        return [self.logits] + [s.present for s in self.kv]



def _dtype(type_str: str, what: str, model: str) -> type:
    dtype = _ORT_DTYPES.get(type_str)
    if dtype is None:
        raise ModelLoadError(model, f"{what} has unsupported type {type_str}")
    return dtype


def inspect_graph(session: ort.InferenceSession, config: dict[str, Any], model: str, *,
                  shared_kv: bool = False) -> GraphSpec:
    """Read names, dtypes and KV shapes from the session; reject graphs we cannot drive.

    `shared_kv`: the graph may be fed one buffer as past and present (onnxruntime-genai's
    `past_present_share_buffer`); it needs an attention_mask, from which it reads the lengths."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if "input_ids" not in inputs:
        raise ModelLoadError(model, f"graph has no input_ids input (inputs: {sorted(inputs)})")
    logits = "logits" if "logits" in outputs else None
    if logits is None:
        raise ModelLoadError(model, f"graph has no logits output (outputs: {sorted(outputs)})")
    pasts = {n: _PAST.match(n) for n in inputs}
    unknown = sorted(n for n, m in pasts.items() if m is None and n not in _KNOWN_INPUTS)
    if unknown:
        raise ModelLoadError(model, f"graph has inputs edged cannot feed: {unknown}")
    layers = sorted({int(m.group(1)) for m in pasts.values() if m})
    if not layers:
        raise ModelLoadError(model, "graph has no past_key_values.N.key/value inputs "
                                    "(export with --task text-generation-with-past)")
    if layers != list(range(len(layers))):
        raise ModelLoadError(model, f"KV-cache layers are not 0..N-1: {layers}")
    slots = []
    for layer in layers:
        for kind in ("key", "value"):
            past, present = f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}"
            if past not in inputs:
                raise ModelLoadError(model, f"graph lacks input {past}")
            if present not in outputs:
                raise ModelLoadError(model, f"graph has {past} but no output {present}")
            slots.append(_kv_slot(inputs[past], present, config, model))
    vocab = outputs[logits].shape[-1] if outputs[logits].shape else None
    if not isinstance(vocab, int):
        vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise ModelLoadError(model, "cannot tell the vocabulary size (logits dim or vocab_size)")
    cfg_vocab = config.get("vocab_size")
    if isinstance(cfg_vocab, int) and cfg_vocab != vocab:
        raise ModelLoadError(model, f"config.json vocab_size {cfg_vocab} != graph logits {vocab}")

    def opt(name: str) -> type | None:
        return _dtype(inputs[name].type, name, model) if name in inputs else None

    return GraphSpec(
        input_ids_dtype=_dtype(inputs["input_ids"].type, "input_ids", model),
        mask_dtype=opt("attention_mask"),
        position_dtype=opt("position_ids"),
        token_type_dtype=opt("token_type_ids"),
        use_cache_branch="use_cache_branch" in inputs,
        logits=logits,
        vocab_size=vocab,
        logits_dtype=_dtype(outputs[logits].type, logits, model),
        kv=tuple(slots),
        shared_kv=shared_kv and "attention_mask" in inputs,
        logits_last_only=len(outputs[logits].shape or ()) == 3 and outputs[logits].shape[1] == 1,
    )


def _kv_slot(node: Any, present: str, config: dict[str, Any], model: str) -> KVSlot:
    shape = list(node.shape)
    if len(shape) != 4:
        raise ModelLoadError(model, f"{node.name} has rank {len(shape)}; edged drives "
                                    "(batch, heads, seq, head_dim) caches only")
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads") \
        or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    head_dim = config.get("head_dim") or (hidden // config.get("num_attention_heads")
                                          if hidden and config.get("num_attention_heads")
                                          else None)
    if not isinstance(shape[1], int):
        shape[1] = heads
    if not isinstance(shape[3], int):
        shape[3] = head_dim
    if not all(isinstance(d, int) and d > 0 for d in (shape[1], shape[3])):
        raise ModelLoadError(model, f"cannot tell heads/head_dim of {node.name} ({node.shape})")
    return KVSlot(past=node.name, present=present, dtype=_dtype(node.type, node.name, model),
                  shape=(1, shape[1], 0, shape[3]))

