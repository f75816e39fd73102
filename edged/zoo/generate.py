"""The prefill + KV-cache decode loop.

Per token the loop does one `session.run`, one sampler call and one detokeniser step (a byte
table lookup, or a small window decode for tokenizers the table does not cover);
everything else (attention mask, position ids, the feeds dict, output names) is built once per
request and only sliced or updated in place. Long prompts are prefilled in chunks through the
cache, so the logits buffer stays (chunk x vocab) however long the prompt is. Three runners:

* `NumpyRunner` (CPU, optimum graphs): `session.run` with numpy arrays, presents fed back.
* `BoundRunner` (CUDA/TensorRT, optimum graphs): IOBinding binds each `present` output to device
  memory and feeds it back as the next `past`, so the cache never goes through the host.
* `SharedRunner` (any provider, GroupQueryAttention graphs whose past and present may share one
  buffer, as onnxruntime-genai's model builder writes them): one (1, kv_heads, prompt + new
  tokens, head_dim) buffer per cache tensor, allocated once per request on the model's device
  and bound as both past and present; the graph writes each new key/value in place and reads the
  lengths from attention_mask. Per token only input_ids and the mask are bound and one logits
  row comes back, into a buffer preallocated on the host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edged.zoo.detok import Detokenizer, StopFilter
from edged.zoo.errors import ContextOverflowError, ZooError
from edged.zoo.graph import GPU_PROVIDERS, GraphSpec
from edged.zoo.params import FinishReason, GenerationParams, GenerationResult
from edged.zoo.sampling import Sampler


class Runnable(Protocol):
    """What the loop needs of a loaded model (`edged.zoo.model.LoadedModel` is one)."""

    name: str
    session: ort.InferenceSession | None
    spec: GraphSpec
    provider: str
    context: int
    tokenizer: Tokenizer
    tokenizer_vocab: int
    eos_token_ids: frozenset[int]


PREFILL_CHUNK = 512  # prompt tokens per prefill run: bounds the (chunk, vocab) logits buffer


def _chunks(prompt: list[int], dtype: type) -> list[np.ndarray]:
    """The prompt in pieces fed one after another through the KV cache; a long prompt would
    otherwise return logits for every position at once (2k tokens x 152k vocab = 1.2 GB)."""
    return [np.asarray([prompt[i : i + PREFILL_CHUNK]], dtype=dtype)
            for i in range(0, len(prompt), PREFILL_CHUNK)]


def _cancelled(cancel: threading.Event | None, done: int) -> bool:
    """Checked between prefill chunks (never before the first: a request cancelled before it
    started does not reach the runner)."""
    return done > 0 and cancel is not None and cancel.is_set()


def _prefill_chunks(runner: BoundRunner | SharedRunner, prompt: list[int],
                    cancel: threading.Event | None) -> np.ndarray | None:
    """Feed the prompt chunk by chunk through an IOBinding runner's `_run`; the last
    position's logits, or None when cancelled between chunks."""
    logits = None
    for chunk in _chunks(prompt, runner.spec.input_ids_dtype):
        if _cancelled(cancel, runner.length):
            return None
        logits = runner._run(chunk)
    return logits


class _Feeds:
    """Inputs of one request, preallocated for its whole length."""

    def __init__(self, spec: GraphSpec, total: int) -> None:
        self.spec = spec
        self.ids1 = np.zeros((1, 1), dtype=spec.input_ids_dtype)
        self.mask = np.ones((1, total), dtype=spec.mask_dtype) if spec.mask_dtype else None
        self.positions = (np.arange(total, dtype=spec.position_dtype)[None, :]
                          if spec.position_dtype else None)
        self.types = np.zeros((1, total), dtype=spec.token_type_dtype) \
            if spec.token_type_dtype else None
        self.branch = (np.array([False]), np.array([True]))

    def inputs(self, ids: np.ndarray, start: int) -> dict[str, np.ndarray]:
        """Non-cache inputs for `ids` placed at positions start..start+len(ids)-1."""
        end = start + ids.shape[1]
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if self.mask is not None:
            feeds["attention_mask"] = self.mask[:, :end]
        if self.positions is not None:
            feeds["position_ids"] = self.positions[:, start:end]
        if self.types is not None:
            feeds["token_type_ids"] = self.types[:, : ids.shape[1]]
        if self.spec.use_cache_branch:
            feeds["use_cache_branch"] = self.branch[start > 0]
        return feeds


class NumpyRunner:
    """CPU: `session.run` with numpy arrays; the presents come back as the next pasts."""

    def __init__(self, session: ort.InferenceSession, spec: GraphSpec, total: int) -> None:
        self.session, self.spec = session, spec
        self.feeds = _Feeds(spec, total)
        self.names = spec.output_names
        self.pasts = [s.past for s in spec.kv]
        self.length = 0

    def prefill(self, prompt: list[int],
                cancel: threading.Event | None = None) -> np.ndarray | None:
        self.current = {s.past: np.zeros(s.shape, dtype=s.dtype) for s in self.spec.kv}
        for chunk in _chunks(prompt, self.spec.input_ids_dtype):
            if _cancelled(cancel, self.length):
                return None
            self.current.update(self.feeds.inputs(chunk, self.length))
            logits = self._run(chunk.shape[1])
        return logits

    def step(self, token: int) -> np.ndarray:
        ids = self.feeds.ids1
        ids[0, 0] = token
        self.current.update(self.feeds.inputs(ids, self.length))
        return self._run(1)

    def _run(self, n: int) -> np.ndarray:
        out = self.session.run(self.names, self.current)
        self.current.update(zip(self.pasts, out[1:], strict=True))
        self.length += n
        return out[0][0, -1]


class BoundRunner:
    """CUDA/TensorRT: IOBinding keeps every `present` on the device and rebinds it as `past`."""

    def __init__(self, session: ort.InferenceSession, spec: GraphSpec, total: int,
                 device: str, device_id: int = 0) -> None:
        self.session, self.spec, self.device, self.device_id = session, spec, device, device_id
        self.feeds = _Feeds(spec, total)
        self.binding = session.io_binding()
        self.length = 0

    def prefill(self, prompt: list[int],
                cancel: threading.Event | None = None) -> np.ndarray | None:
        self._empty = [np.zeros(s.shape, dtype=s.dtype) for s in self.spec.kv]
        for slot, empty in zip(self.spec.kv, self._empty, strict=True):
            self.binding.bind_cpu_input(slot.past, empty)
        return _prefill_chunks(self, prompt, cancel)

    def step(self, token: int) -> np.ndarray:
        ids = self.feeds.ids1
        ids[0, 0] = token
        return self._run(ids)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        b = self.binding
        for name, value in self.feeds.inputs(ids, self.length).items():
            b.bind_cpu_input(name, value)
        b.clear_binding_outputs()
        b.bind_output(self.spec.logits, "cpu")
        for slot in self.spec.kv:
            b.bind_output(slot.present, self.device, self.device_id)
        self.session.run_with_iobinding(b)
        out = b.get_outputs()
        for slot, value in zip(self.spec.kv, out[1:], strict=True):
            b.bind_ortvalue_input(slot.past, value)
        self.length += ids.shape[1]
        return out[0].numpy()[0, -1]


class SharedRunner:
    """GroupQueryAttention graphs: one buffer per cache tensor is both past and present."""

    def __init__(self, session: ort.InferenceSession, spec: GraphSpec, total: int,
                 device: str = "cpu", device_id: int = 0) -> None:
        self.session, self.spec = session, spec
        self.binding = b = session.io_binding()
        self.mask = np.ones(total, dtype=spec.mask_dtype)  # 1-D: every [:n] slice is contiguous
        self.ids1 = np.zeros((1, 1), dtype=spec.input_ids_dtype)
        self.logits1 = np.empty((1, 1, spec.vocab_size), dtype=spec.logits_dtype)
        self.cache = []  # the OrtValues, kept alive for the request
        for slot in spec.kv:
            heads, _, dim = slot.shape[1:]
            zeros = np.zeros((1, heads, total, dim), dtype=slot.dtype)
            value = ort.OrtValue.ortvalue_from_numpy(zeros, device, device_id)
            self.cache.append(value)
            b.bind_ortvalue_input(slot.past, value)
            b.bind_ortvalue_output(slot.present, value)
        self.length = 0
        self.total = total

    def prefill(self, prompt: list[int],
                cancel: threading.Event | None = None) -> np.ndarray | None:
        return _prefill_chunks(self, prompt, cancel)

    def step(self, token: int) -> np.ndarray:
        self.ids1[0, 0] = token
        return self._run(self.ids1)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        b, n = self.binding, ids.shape[1]
        end = self.length + n
        if end > self.total:
            raise ZooError(f"KV buffer holds {self.total} tokens, asked for {end}")
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", self.mask[:end].reshape(1, end))
        # logits land in a host buffer of ours (one preallocated row when decoding), so the
        # result is read without asking the binding for its outputs
        rows = 1 if self.spec.logits_last_only else n
        out = self.logits1 if rows == 1 else np.empty((1, rows, self.spec.vocab_size),
                                                      dtype=self.spec.logits_dtype)
        b.bind_output(self.spec.logits, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        self.session.run_with_iobinding(b)
        self.length = end
        return out[0, -1]


def make_runner(model: Runnable, session: ort.InferenceSession,
                total: int) -> NumpyRunner | BoundRunner | SharedRunner:
    """The runner for this model's graph and provider."""
    device = GPU_PROVIDERS.get(model.provider)
    device_id = getattr(model, "device_id", 0)
    if model.spec.shared_kv:
        return SharedRunner(session, model.spec, total, device or "cpu", device_id=device_id)
    if device:
        return BoundRunner(session, model.spec, total, device, device_id=device_id)
    return NumpyRunner(session, model.spec, total)


def generate(model: Runnable, prompt_ids: list[int], params: GenerationParams, *,
             on_delta: Callable[[str], None] | None = None,
             cancel: threading.Event | None = None) -> GenerationResult:
    """Prefill the prompt, then decode token by token until EOS, a stop string, the length
    limit or `cancel`; text deltas go to `on_delta` as soon as they are whole characters."""
    t0 = time.perf_counter()
    n_prompt = len(prompt_ids)
    if n_prompt + params.max_new_tokens > model.context:
        raise ContextOverflowError(n_prompt, params.max_new_tokens, model.context)
    session = model.session
    if session is None:
        raise ZooError(f"model {model.name} was unloaded")
    total = n_prompt + params.max_new_tokens
    runner = make_runner(model, session, total)
    sampler = Sampler(params, model.spec.vocab_size, model.tokenizer_vocab)
    sampler.observe(prompt_ids)
    detok = Detokenizer(model.tokenizer, prompt_ids, getattr(model, "detok_table", None))
    stops = StopFilter(params.stop)
    eos = model.eos_token_ids
    parts: list[str] = []

    def emit(text: str) -> None:
        if text:
            parts.append(text)
            if on_delta is not None:
                on_delta(text)

    out: list[int] = []
    logprobs: list[float] = []
    finish: FinishReason = "length"
    t_first = None
    if cancel is not None and cancel.is_set():
        finish = "cancelled"
    else:
        logits = runner.prefill(prompt_ids, cancel)
        if logits is None:  # cancelled between prefill chunks
            finish = "cancelled"
        while logits is not None:
            token = sampler(logits)
            if params.logprobs:
                logprobs.append(token_logprob(logits, token))
            if t_first is None:
                t_first = time.perf_counter()
            out.append(token)
            sampler.observe((token,))
            if token in eos:
                finish = "eos"
                break
            emit(stops.feed(detok.push(token)))
            if stops.stopped:
                finish = "stop"
                break
            if len(out) >= params.max_new_tokens:
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            logits = runner.step(token)
    if not stops.stopped:
        emit(stops.feed(detok.flush()))
        if stops.stopped:
            finish = "stop"
        emit(stops.flush())
    t_end = time.perf_counter()
    t_first = t_first or t_end
    decode_s = t_end - t_first
    return GenerationResult(
        text="".join(parts),
        token_ids=out,
        prompt_tokens=n_prompt,
        completion_tokens=len(out),
        finish_reason=finish,
        ttft_ms=(t_first - t0) * 1e3,
        total_ms=(t_end - t0) * 1e3,
        tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
        provider=model.provider,
        model=model.name,
        prompt_ids=list(prompt_ids),
        token_logprobs=logprobs,
    )


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token] of one row.

    In float32 (SIMD exp, numpy's pairwise sum, one temporary), not float64: with the caches as a
    decode step leaves them this costs ~70 us a token instead of ~160 us (SmolLM2's 49k vocab;
    ~1-2 % of an int4 step), within ~3e-8 of the float64 value, far below the float32 logits'
    own rounding."""
    row = np.asarray(logits).reshape(-1)
    if row.dtype != np.float32:
        row = row.astype(np.float32)
    top = row.max()
    shifted = row - top
    total = np.exp(shifted, out=shifted).sum()  # >= 1: the top term is exp(0)
    return float(np.float64(row[token]) - np.float64(top) - np.log(np.float64(total)))


def teacher_forced_agreement(model: Runnable, prompt_ids: list[int],
                             reference: list[int]) -> tuple[float, int]:
    """How often this model's greedy choice equals `reference` (another model's greedy ids)
    when both see the same prefix: (share of positions that agree, length of the identical
    prefix a free-running greedy decode would produce). Fair to compare a quantised model with
    fp32: one early different token does not count every later position as wrong."""
    session = model.session
    if session is None:
        raise ZooError(f"model {model.name} was unloaded")
    runner = make_runner(model, session, len(prompt_ids) + len(reference))
    logits = runner.prefill(prompt_ids)
    same, prefix = 0, None
    for i, token in enumerate(reference):
        hit = int(np.argmax(logits[: model.tokenizer_vocab])) == token
        same += hit
        if not hit and prefix is None:
            prefix = i
        if i + 1 < len(reference):
            logits = runner.step(token)
    return same / max(1, len(reference)), len(reference) if prefix is None else prefix
