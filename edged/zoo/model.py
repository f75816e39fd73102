"""A model directory: files, config, tokenizer and the onnxruntime session.

The graph's layout (inputs, KV cache) comes from `edged.zoo.graph`; the loop that runs it from
`edged.zoo.generate`. Both import nothing of this module, so the imports go one way only:
model -> generate -> graph.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnxruntime as ort
from tokenizers import Tokenizer

from edged.hugepages import TUNABLE, thp_mode
from edged.zoo.chat import ChatTemplate, Message, plain_prompt, validate_messages
from edged.zoo.detok import byte_table
from edged.zoo.errors import InvalidRequestError, ModelLoadError, ProviderError
from edged.zoo.generate import generate as _generate
from edged.zoo.graph import (  # noqa: F401  (re-exported: edged.zoo.model's old names)
    GPU_PROVIDERS,
    GraphSpec,
    KVSlot,
    inspect_graph,
)
from edged.zoo.params import GenerationParams, GenerationResult

MODEL_FILES = ("model.onnx", "decoder_model_merged.onnx")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                "seq_length")
_VOCAB_PAD_LIMIT = 1024  # model vocab may exceed the tokenizer's by padding rows, not more


log = logging.getLogger("edged.zoo")


class ProviderFallbackWarning(RuntimeWarning):
    """onnxruntime runs the model on another execution provider than the one asked for."""


@dataclass(frozen=True)
class SessionConfig:
    """How to build the onnxruntime session."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    allow_fallback: bool = True
    intra_op_threads: int = 0  # 0 = onnxruntime's default
    inter_op_threads: int = 0


def read_json(path: Path, model: str, *, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(model, f"missing file {path.name} in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(model, f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(model, f"{path} must hold a JSON object")
    return data


def _ids(value: object) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []



def _session_options(cfg: SessionConfig) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if cfg.intra_op_threads:
        so.intra_op_num_threads = cfg.intra_op_threads
    if cfg.inter_op_threads:
        so.inter_op_num_threads = cfg.inter_op_threads
    # onnxruntime's pool threads spin-wait between kernels by default: with one thread per pool
    # there is no one to wait for, and the spinning burns the other cores (on a 2-core board
    # SmolLM2 int4 decoded 10% slower per CPU-second). onnxruntime-genai turns it off too.
    if cfg.intra_op_threads == 1:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if cfg.inter_op_threads == 1:
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def _resolve_providers(cfg: SessionConfig, model: str) -> list[str]:
    """Drop providers this onnxruntime build lacks (a warning or a ProviderError)."""
    available = ort.get_available_providers()
    wanted = list(cfg.providers) or ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        hint = ""
        if any(p in GPU_PROVIDERS for p in missing) and "onnxruntime-gpu" not in \
                runtime_packages():
            hint = "; onnxruntime-gpu is not installed (pip install -e '.[gpu]')"
        _fallback(cfg, model, f"execution provider(s) {missing} not in this onnxruntime build "
                              f"(available: {available}; packages: {runtime_packages()}){hint}")
    kept = [p for p in wanted if p in available]
    return kept or ["CPUExecutionProvider"]


def _fallback(cfg: SessionConfig, model: str, message: str) -> None:
    if not cfg.allow_fallback:
        raise ProviderError(model, message + "; set allow_fallback to run anyway")
    warnings.warn(f"model {model}: {message}; falling back", ProviderFallbackWarning,
                  stacklevel=3)


ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml",
                     "onnxruntime-openvino", "onnxruntime-qnn", "onnxruntime-training")


def runtime_packages() -> dict[str, str]:
    """Installed distributions that provide the `onnxruntime` module, with their versions.
    More than one means the files of the last one installed shadow the others' (a CUDA build
    overwritten by the CPU one reports only CPUExecutionProvider)."""
    from importlib import metadata

    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def runtime_conflict() -> str | None:
    """A message when several onnxruntime packages share the module, else None."""
    found = runtime_packages()
    if len(found) < 2:
        return None
    names = " ".join(found)
    return (f"several onnxruntime packages are installed ({found}); they share one "
            f"`onnxruntime` module and the last installed wins (now: "
            f"{ort.get_available_providers()}). Keep one: pip uninstall -y {names} && "
            "pip install onnxruntime-gpu  (or onnxruntime for CPU only)")


_warned_conflict = False
THP_TUNABLE = TUNABLE
_told_thp = False


def huge_pages_hint() -> str | None:
    """How to put the weights in transparent huge pages, when this process does not and could:
    glibc's malloc does it with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (read at process start).
    `edged serve` / `edged generate` re-execute themselves with it (`edged.hugepages`), so this
    is for processes that load models in-process or opted out. CPU decode streams every weight
    once per token; with 4 KiB pages the TLB misses cost SmolLM2 int4 a tenth to a fifth of its
    decode speed here (docs/zoo.md, "Speed")."""
    import os

    if "hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if thp_mode() not in ("always", "madvise"):
        return None
    return (f"set GLIBC_TUNABLES={THP_TUNABLE} in this process's environment to back the "
            "weights with transparent huge pages (faster CPU decode; edged serve/generate do "
            "it themselves unless EDGED_HUGE_PAGES=0)")


def create_session(path: Path, cfg: SessionConfig, model: str) -> ort.InferenceSession:
    """Build the session and check that the first provider asked for is the one running."""
    global _warned_conflict
    conflict = runtime_conflict()
    if conflict and not _warned_conflict:
        _warned_conflict = True
        warnings.warn(conflict, RuntimeWarning, stacklevel=2)
        log.warning("%s", conflict)
    providers = _resolve_providers(cfg, model)
    global _told_thp
    if not _told_thp and providers[0] == "CPUExecutionProvider":
        _told_thp = True
        hint = huge_pages_hint()
        if hint:
            log.info("%s", hint)
    if any(p in GPU_PROVIDERS for p in providers) and hasattr(ort, "preload_dlls"):
        try:  # finds CUDA/cuDNN from pip-installed nvidia packages (onnxruntime-gpu >= 1.21)
            ort.preload_dlls()
        except Exception as exc:  # only a help: the provider check below decides
            warnings.warn(f"onnxruntime.preload_dlls failed: {exc}", RuntimeWarning,
                          stacklevel=2)
    try:
        session = ort.InferenceSession(str(path), sess_options=_session_options(cfg),
                                       providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        raise ModelLoadError(model, f"{path.name} does not load in onnxruntime: {exc}") from exc
    actual = session.get_providers()
    if providers[0] not in actual:
        _fallback(cfg, model, f"asked for {providers[0]} but onnxruntime runs {actual}")
    return session


def _device_id(session: ort.InferenceSession, provider: str) -> int:
    """The GPU the session really runs on (provider option device_id; 0 when not set)."""
    try:
        return int(session.get_provider_options().get(provider, {}).get("device_id", 0))
    except (TypeError, ValueError, AttributeError):
        return 0


def _share_buffer(genai: dict[str, Any]) -> bool:
    """onnxruntime-genai's `search.past_present_share_buffer` (its GroupQueryAttention graphs)."""
    search = genai.get("search")
    return isinstance(search, dict) and search.get("past_present_share_buffer") is True


def _config_from_genai(genai: dict[str, Any]) -> dict[str, Any]:
    """config.json's keys that edged reads, from an onnxruntime-genai `genai_config.json` (a
    model builder output dir loads as it is)."""
    model = genai.get("model") if isinstance(genai.get("model"), dict) else {}
    decoder = model.get("decoder") if isinstance(model.get("decoder"), dict) else {}
    out = {"max_position_embeddings": model.get("context_length"),
           "vocab_size": model.get("vocab_size"), "bos_token_id": model.get("bos_token_id"),
           "eos_token_id": model.get("eos_token_id"), "pad_token_id": model.get("pad_token_id"),
           "num_attention_heads": decoder.get("num_attention_heads"),
           "num_key_value_heads": decoder.get("num_key_value_heads"),
           "hidden_size": decoder.get("hidden_size"), "head_dim": decoder.get("head_size")}
    return {k: v for k, v in out.items() if v is not None}


def find_model_file(directory: Path, model: str) -> Path:
    for name in MODEL_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ModelLoadError(model, f"no ONNX decoder in {directory} (looked for {list(MODEL_FILES)})")


def model_size_bytes(onnx_file: Path) -> int:
    """The weights' size on disk: the graph plus its external data (`model.onnx_data`, ...)."""
    return sum(f.stat().st_size for f in onnx_file.parent.iterdir()
               if f.is_file() and f.name.startswith(onnx_file.name))


class LoadedModel:
    """A ready-to-run model: session, graph layout, tokenizer, ids and defaults."""

    def __init__(self, directory: Path, *, name: str | None = None,
                 session_config: SessionConfig | None = None,
                 defaults: GenerationParams | None = None, context: int | None = None) -> None:
        directory = Path(directory)
        # optimum's habit of an `onnx/` subfolder: name the model after its parent then
        self.name = name or (directory.resolve().parent.name if directory.name == "onnx"
                             else directory.name)
        self.directory = directory
        if not directory.is_dir():
            raise ModelLoadError(self.name, f"model directory {directory} does not exist")
        self.session_config = session_config or SessionConfig()
        genai = read_json(directory / "genai_config.json", self.name, required=False)
        self.config = (read_json(directory / "config.json", self.name)
                       if (directory / "config.json").is_file() or not genai
                       else _config_from_genai(genai))
        gen_config = read_json(directory / "generation_config.json", self.name, required=False)
        tok_config = read_json(directory / "tokenizer_config.json", self.name, required=False)
        self.tokenizer = self._load_tokenizer(directory / "tokenizer.json")
        self.onnx_path = find_model_file(directory, self.name)
        self.size_bytes = model_size_bytes(self.onnx_path)
        self.session = create_session(self.onnx_path, self.session_config, self.name)
        self.provider: str = self.session.get_providers()[0]
        self.device_id = _device_id(self.session, self.provider)
        self.spec = inspect_graph(self.session, self.config, self.name,
                                  shared_kv=_share_buffer(genai))
        log.info("model %s: %s runs on %s (asked %s)%s", self.name, self.onnx_path.name,
                 self.provider, list(self.session_config.providers),
                 "; KV cache shared past/present" if self.spec.shared_kv else "")
        self.context = context or self._context()
        self.defaults = _generation_defaults(defaults, gen_config, self.context, self.name)
        self.tokenizer_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self._check_vocab()
        #: per-id bytes for the detokeniser's fast path (None: it decodes id windows instead)
        self.detok_table = byte_table(self.tokenizer)
        self.bos_token_id, self.eos_token_ids = self._special_ids(gen_config, tok_config)
        self.chat_template = self._chat_template(tok_config)

    # -- loading helpers -------------------------------------------------------------------
    def _load_tokenizer(self, path: Path) -> Tokenizer:
        if not path.is_file():
            raise ModelLoadError(self.name, f"missing file tokenizer.json in {path.parent}")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception
            raise ModelLoadError(self.name, f"{path} does not load as a tokenizer: {exc}") from exc

    def _context(self) -> int:
        for key in CONTEXT_KEYS:
            value = self.config.get(key)
            if isinstance(value, int) and value > 0:
                return value
        raise ModelLoadError(self.name, f"config.json names no context length ({CONTEXT_KEYS})")

    def _check_vocab(self) -> None:
        tok, graph = self.tokenizer_vocab, self.spec.vocab_size
        if tok > graph:
            raise ModelLoadError(self.name, f"tokenizer has {tok} ids but the model's vocabulary "
                                            f"is {graph}: wrong tokenizer.json?")
        if graph - tok > _VOCAB_PAD_LIMIT:
            raise ModelLoadError(self.name, f"tokenizer has {tok} ids but the model's vocabulary "
                                            f"is {graph} (more than {_VOCAB_PAD_LIMIT} padding "
                                            "rows): wrong tokenizer.json?")

    def _special_ids(self, gen_config: dict[str, Any],
                     tok_config: dict[str, Any]) -> tuple[int | None, frozenset[int]]:
        eos = set(_ids(self.config.get("eos_token_id")) + _ids(gen_config.get("eos_token_id")))
        eos_tok = _token_text(tok_config.get("eos_token"))
        if eos_tok is not None and self.tokenizer.token_to_id(eos_tok) is not None:
            eos.add(self.tokenizer.token_to_id(eos_tok))
        bos = _ids(self.config.get("bos_token_id")) or _ids(gen_config.get("bos_token_id"))
        return (bos[0] if bos else None), frozenset(e for e in eos if 0 <= e < self.spec.vocab_size)

    def _chat_template(self, tok_config: dict[str, Any]) -> ChatTemplate | None:
        source = tok_config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja_file = self.directory / "chat_template.jinja"
        if not isinstance(source, str) and jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        if not isinstance(source, str):
            return None
        return ChatTemplate(source, bos_token=_token_text(tok_config.get("bos_token")) or "",
                            eos_token=_token_text(tok_config.get("eos_token")) or "",
                            model=self.name)

    # -- requests ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | bytes | None = None,
                      messages: Sequence[Message] | None = None) -> list[int]:
        """Prompt text or chat messages -> token ids (validated, never empty)."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages")
        special = True
        if messages is not None:
            msgs = validate_messages(messages)
            if self.chat_template is not None:
                text, special = self.chat_template.render(msgs), False  # template has the BOS
            else:
                text = plain_prompt(msgs)
        else:
            text = _as_text(prompt)
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=special).ids
        except Exception as exc:  # tokenizers rejects e.g. lone surrogates
            raise InvalidRequestError(f"prompt cannot be tokenised: {exc}") from exc
        if not ids:
            if self.bos_token_id is None:
                raise InvalidRequestError(f"empty prompt, and model {self.name} has no BOS token "
                                          "to start from")
            ids = [self.bos_token_id]
        return ids

    def generate(self, prompt: str | bytes | None = None, *, params: GenerationParams | None = None,
                 messages: Sequence[Message] | None = None,
                 on_delta: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Generate a completion; see `edged.zoo.generate.generate` for the loop."""
        params = params or self.defaults
        if not isinstance(params, GenerationParams):
            raise InvalidRequestError(f"params must be GenerationParams, not {type(params)}")
        ids = self.encode_prompt(prompt, messages)
        return _generate(self, ids, params, on_delta=on_delta, cancel=cancel)

    def close(self) -> None:
        """Drop the session (its memory goes when the last running generation ends)."""
        self.session = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, provider={self.provider!r}, context={self.context})"


_HF_GENERATION = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


def _generation_defaults(given: GenerationParams | None, gen_config: dict[str, Any],
                         context: int, model: str) -> GenerationParams:
    """The model's own generation defaults: `given` (a manifest's [models.generation]) when it
    sets anything, else the model's generation_config.json (a greedy `do_sample: false` keeps
    temperature 0), else edged's; `max_new_tokens` clamped below the context length, so a
    request that sets nothing never asks for more tokens than the model can hold."""
    params = given if given is not None else GenerationParams()
    if given is None or given == GenerationParams():
        picked = {key: gen_config[key] for key in _HF_GENERATION if key in gen_config}
        if not gen_config.get("do_sample", False):
            picked.pop("temperature", None)  # transformers ignores it when not sampling
        for key, value in picked.items():
            try:
                params = replace(params, **{key: value})
            except (InvalidRequestError, TypeError):
                warnings.warn(f"{model}: generation_config.json {key}={value!r} ignored",
                              RuntimeWarning, stacklevel=3)
    if params.max_new_tokens >= context:
        params = replace(params, max_new_tokens=max(1, context - 1))
    return params


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_text(prompt: object) -> str:
    if isinstance(prompt, bytes):
        try:
            return prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(f"prompt is not valid UTF-8: byte {exc.start} "
                                      f"({prompt[exc.start:exc.start + 1]!r})") from exc
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"prompt must be str or UTF-8 bytes, not {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"prompt is not valid UTF-8 text: character {exc.start} is a "
                                  "lone surrogate (undecodable input bytes?)") from exc
    return prompt


def load_model(directory: Path | str, providers: Sequence[str] | None = None, *,
               allow_fallback: bool = True, intra_op_threads: int = 0, inter_op_threads: int = 0,
               name: str | None = None, defaults: GenerationParams | None = None,
               context: int | None = None) -> LoadedModel:
    """Load one optimum-exported model directory (raises ModelLoadError naming the problem)."""
    cfg = SessionConfig(providers=tuple(providers or ("CPUExecutionProvider",)),
                        allow_fallback=allow_fallback, intra_op_threads=intra_op_threads,
                        inter_op_threads=inter_op_threads)
    return LoadedModel(Path(directory), name=name, session_config=cfg, defaults=defaults,
                       context=context)
