"""zoo.toml validation and the Zoo: lazy/eager loading, unload, LRU under a memory cap,
bad models recorded without taking the others down."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_zoo_graph import expected, make_dir

from edged.zoo import (
    GenerationParams,
    ManifestError,
    ModelLoadError,
    UnknownModelError,
    Zoo,
    ZooManifest,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("small", "medium", "large"):
        make_dir(tmp_path, name, mask=True)
    return tmp_path


def write(root: Path, text: str) -> Path:
    path = root / "zoo.toml"
    path.write_text(text)
    return path


MODELS = """
[[models]]
name = "small"
path = "small"
[models.generation]
max_new_tokens = 5
stop = ["t99"]

[[models]]
name = "medium"
path = "medium"

[[models]]
name = "large"
path = "large"
"""


def test_manifest_parses_in_cost_order(root: Path) -> None:
    m = ZooManifest.load(write(root, 'checker = "number"\n[zoo]\nload = "lazy"\n'
                                     'intra_op_threads = 1\n' + MODELS))
    assert m.names == ["small", "medium", "large"] and m.checker == "number"
    small = m.models[0]
    assert small.path == root / "small" and small.session.intra_op_threads == 1
    assert small.generation == GenerationParams(max_new_tokens=5, stop=("t99",))
    assert m.models[1].generation == GenerationParams()


@pytest.mark.parametrize(("text", "model", "field", "needle"), [
    ("[zoo]\nload = 'sometimes'\n" + MODELS, None, "zoo.load", "eager"),
    ("[zoo]\nmemory_cap_mb = -1\n" + MODELS, None, "zoo.memory_cap_mb", ">= 0"),
    ("[zoo]\nprovider = ['CPUExecutionProvider']\n" + MODELS, None, "zoo.provider", "unknown"),
    ("[zoo]\nproviders = []\n" + MODELS, None, "zoo.providers", "non-empty list"),
    ("checker = 3\n" + MODELS, None, "checker", "non-empty string"),
    ("[zoo]\n", None, "models", "at least one"),
    (MODELS.replace('max_new_tokens = 5', 'max_new_tokens = -5'), "small",
     "generation.max_new_tokens", ">= 1"),
    (MODELS.replace('max_new_tokens = 5', 'temprature = 0.5'), "small",
     "generation.temprature", "unknown field"),
    (MODELS.replace('path = "medium"', 'path = 3'), "medium", "path", "non-empty string"),
    (MODELS.replace('name = "large"', 'name = "small"'), "small", "name", "duplicate"),
    (MODELS.replace('name = "large"', 'name = "a b"'), "models[2]", "name", "not a name"),
    (MODELS.replace('path = "large"', 'path = "large"\nintra_op_threads = -2'), "large",
     "intra_op_threads", "integer >= 0"),
    (MODELS + "colour = 'red'\n", "large", "colour", "unknown field"),
])
def test_manifest_errors_name_file_model_and_field(root: Path, text: str, model: str | None,
                                                  field: str, needle: str) -> None:
    path = write(root, text)
    with pytest.raises(ManifestError, match=needle) as info:
        ZooManifest.load(path)
    err = info.value
    assert (err.path, err.model, err.field) == (path, model, field)
    assert str(path) in str(err) and field in str(err)


def test_manifest_file_problems(root: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        ZooManifest.load(root / "absent.toml")
    with pytest.raises(ManifestError, match="not valid TOML"):
        ZooManifest.load(write(root, "[[models]\nname="))


def test_lazy_zoo_loads_on_first_use_and_unloads(root: Path) -> None:
    zoo = Zoo.from_manifest(write(root, '[zoo]\nload = "lazy"\n' + MODELS))
    assert zoo.loaded == [] and zoo.status() == dict.fromkeys(zoo.names, "unloaded")
    small = zoo.get("small")
    assert zoo.get("small") is small and zoo.loaded == ["small"]
    result = small.generate("t3 t5 t9")  # the per-model defaults from the manifest
    assert result.completion_tokens == 5 and result.token_ids == expected([3, 5, 9], 5)
    assert zoo.unload("small") and not zoo.unload("small")
    assert zoo.loaded == [] and zoo.get("small") is not small
    with pytest.raises(UnknownModelError, match="no model 'huge'"):
        zoo.get("huge")


def test_memory_cap_evicts_least_recently_used(root: Path) -> None:
    size_mb = (root / "small" / "model.onnx").stat().st_size / 2**20
    text = f'[zoo]\nload = "lazy"\nmemory_cap_mb = {size_mb * 2.5}\n' + MODELS
    zoo = Zoo.from_manifest(write(root, text))
    zoo.get("small")
    zoo.get("medium")
    zoo.get("small")  # now medium is the least recently used
    zoo.get("large")
    assert zoo.loaded == ["small", "large"]
    assert zoo.memory_mb() <= size_mb * 2.5


def test_eager_zoo_fills_the_cap_without_evicting(root: Path) -> None:
    size_mb = (root / "small" / "model.onnx").stat().st_size / 2**20
    zoo = Zoo.from_manifest(write(root, f"[zoo]\nmemory_cap_mb = {size_mb * 2.5}\n" + MODELS))
    assert zoo.loaded == ["small", "medium"]
    assert zoo.get("large") and zoo.loaded == ["medium", "large"]


def test_model_bigger_than_the_cap_is_a_typed_error(root: Path) -> None:
    zoo = Zoo.from_manifest(write(root, '[zoo]\nload = "lazy"\nmemory_cap_mb = 0.000001\n'
                                  + MODELS))
    with pytest.raises(ModelLoadError, match="more than the zoo's memory_cap_mb"):
        zoo.get("small")


@pytest.mark.parametrize("breakage", ["missing_dir", "corrupt_onnx", "no_tokenizer"])
def test_bad_model_never_takes_the_others_down(root: Path, breakage: str) -> None:
    if breakage == "missing_dir":
        (root / "zoo.toml").write_text(MODELS.replace('path = "medium"', 'path = "nowhere"'))
    else:
        target = root / "medium" / ("model.onnx" if breakage == "corrupt_onnx"
                                    else "tokenizer.json")
        if breakage == "corrupt_onnx":
            target.write_bytes(b"not an onnx file")
        else:
            target.unlink()
        write(root, MODELS)
    with pytest.warns(RuntimeWarning, match="model medium"):
        zoo = Zoo.from_manifest(root / "zoo.toml")
    assert zoo.loaded == ["small", "large"]
    assert zoo.status()["medium"].startswith("failed: model medium")
    with pytest.raises(ModelLoadError, match="model medium") as first:
        zoo.get("medium")
    with pytest.raises(ModelLoadError) as again:
        zoo.get("medium")
    assert again.value is first.value is zoo.failures["medium"]
    assert zoo.get("large").generate("t1", params=GenerationParams(max_new_tokens=2))


def test_fixed_model_can_be_reloaded(root: Path) -> None:
    data = (root / "medium" / "model.onnx").read_bytes()
    (root / "medium" / "model.onnx").write_bytes(b"broken")
    zoo = Zoo.from_manifest(write(root, '[zoo]\nload = "lazy"\n' + MODELS))
    with pytest.raises(ModelLoadError):
        zoo.get("medium")
    (root / "medium" / "model.onnx").write_bytes(data)
    assert zoo.load("medium").name == "medium" and "medium" not in zoo.failures


def test_from_dirs_and_concurrent_gets(root: Path) -> None:
    zoo = Zoo.from_dirs([root / "small", root / "large"])
    assert zoo.names == ["small", "large"] and zoo.manifest.checker == "exact"
    results: list[list[int]] = []

    def work() -> None:
        model = zoo.get("large")
        results.append(model.generate("t2", params=GenerationParams(max_new_tokens=6)).token_ids)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected([2], 6)] * 6
    with pytest.raises(ManifestError, match="distinct"):
        Zoo.from_dirs([root / "small", root / "small"])


def test_a_slow_load_does_not_block_loaded_models(root: Path, monkeypatch) -> None:
    """While `large` loads (held at a gate here), `small` keeps serving; a second `get(large)`
    waits for the first load instead of loading twice."""
    import edged.zoo.manifest as manifest_module

    zoo = Zoo.from_manifest(write(root, '[zoo]\nload = "lazy"\n' + MODELS))
    small = zoo.get("small")
    entered, release = threading.Event(), threading.Event()
    loads: list[str] = []
    real = manifest_module.LoadedModel

    def held(path, **kw):
        loads.append(kw["name"])
        if kw["name"] == "large":
            entered.set()
            assert release.wait(10)
        return real(path, **kw)

    monkeypatch.setattr(manifest_module, "LoadedModel", held)
    got: list[object] = []
    workers = [threading.Thread(target=lambda: got.append(zoo.get("large"))) for _ in range(2)]
    for w in workers:
        w.start()
    assert entered.wait(10)
    assert zoo.get("small") is small  # not blocked by the load in flight
    assert small.generate("t1", params=GenerationParams(max_new_tokens=2)).completion_tokens == 2
    release.set()
    for w in workers:
        w.join(10)
    assert len(got) == 2 and got[0] is got[1] and loads == ["large"]
