"""State file: bit-exact round trip, same decisions after restore, bad files set aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.router import Router, RouterConfig, StateError

NAMES = ["small", "medium", "large"]
TEXTS = ["what is 2+2", "name a planet", "why is the sky blue", "capital of France?"]


def drive(router: Router, n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d = router.decide(TEXTS[i % len(TEXTS)] + str(i % 7))
        router.observe_energy(d, {m: 10.0 * (1 + NAMES.index(m)) for m in d.run})
        router.observe_labels(d, {m: float(rng.random() < 0.7) for m in d.run})
        out.append((d.t, d.model, d.run, d.explored, d.q))
    return out


@settings(deadline=None, max_examples=8)
@given(st.integers(0, 2**31), st.integers(1, 60))
def test_round_trip_resumes_same_decisions(tmp_path_factory, seed: int, warm: int) -> None:
    path = tmp_path_factory.mktemp("state") / "router.state"
    cfg = RouterConfig(alpha=0.7, seed=seed, dim_bits=10, c=0.5)
    a = Router(NAMES, cfg)
    drive(a, warm, seed)
    a.save(path)
    b = Router.restore(path, NAMES, cfg)
    for key, value in a.predictor.arrays().items():
        assert np.array_equal(value, b.predictor.arrays()[key])
    assert (a.t, a.q, a.z, a.lam) == (b.t, b.q, b.z, b.lam)
    assert drive(a, 30, seed + 1) == drive(b, 30, seed + 1)
    assert a.stats() == b.stats()


def test_missing_file_gives_fresh_router(tmp_path: Path) -> None:
    assert Router.restore(tmp_path / "none.state", NAMES).t == 0


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04garbage"])
def test_corrupt_file_is_set_aside(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "router.state"
    path.write_bytes(content)
    with pytest.raises(StateError, match="moved aside") as info:
        Router.restore(path, NAMES)
    assert not path.exists()
    assert info.value.aside is not None and info.value.aside.read_bytes() == content
    assert info.value.aside.name.startswith("router.state.corrupt-")


def test_incompatible_zoo_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "router.state"
    Router(NAMES, RouterConfig(dim_bits=10)).save(path)
    with pytest.raises(StateError, match="names"):
        Router.restore(path, ["a", "b"], RouterConfig(dim_bits=10))
    assert not path.exists() and len(list(tmp_path.glob("router.state.corrupt-*"))) == 1


def test_save_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "router.state"
    router = Router(NAMES, RouterConfig(dim_bits=10))
    drive(router, 5, 0)
    router.save(path)
    router.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["router.state"]


# -- issue 11: poisoned, unreadable and unmovable state files ---------------------------------

def _poison(path: Path, meta_changes: dict | None = None, array_changes: dict | None = None
            ) -> None:
    from edged.router.state import read_state, write_state

    meta, arrays = read_state(path)
    meta.update(meta_changes or {})
    for name, fn in (array_changes or {}).items():
        arrays[name] = fn(arrays[name])
    write_state(path, meta, arrays)


@pytest.mark.parametrize("meta, arrays", [
    ({"t": -3}, None),
    ({"q": float("inf")}, None),
    ({"debt": float("nan")}, None),
    ({"t": 2.5}, None),
    (None, {"pred_weights": lambda a: np.full_like(a, np.nan)}),
    (None, {"energy_count": lambda a: a - 5}),
    (None, {"pred_grad_sq": lambda a: -a}),
])
def test_poisoned_state_is_refused_and_set_aside(tmp_path, meta, arrays):
    cfg = RouterConfig(alpha=0.7, seed=0, dim_bits=10)
    router = Router(NAMES, cfg)
    drive(router, 20, 0)
    path = tmp_path / "router.state"
    router.save(path)
    _poison(path, meta, arrays)
    with pytest.raises(StateError, match="invalid") as exc:
        Router.restore(path, NAMES, cfg)
    assert exc.value.aside is not None and exc.value.aside.exists() and not path.exists()


def test_unreadable_state_is_not_set_aside(tmp_path, monkeypatch):
    from edged.router.state import StateUnreadableError

    cfg = RouterConfig(alpha=0.7, seed=0, dim_bits=10)
    path = tmp_path / "router.state"
    Router(NAMES, cfg).save(path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(np, "load", denied)
    with pytest.raises(StateUnreadableError, match="cannot read"):
        Router.restore(path, NAMES, cfg)
    assert path.exists() and not list(tmp_path.glob("*.corrupt-*"))


def test_corrupt_state_in_a_read_only_dir_is_left_with_a_clear_error(tmp_path, monkeypatch):
    import edged.router.state as state

    path = tmp_path / "router.state"
    path.write_bytes(b"not a zip")

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(state.os, "replace", read_only)
    with pytest.raises(StateError, match="could not move it aside") as exc:
        Router.restore(path, NAMES, RouterConfig(dim_bits=10))
    assert exc.value.aside is None and path.read_bytes() == b"not a zip"
