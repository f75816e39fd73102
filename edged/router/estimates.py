"""Running mean and spread per model (Welford), for energy and latency estimates."""

from __future__ import annotations

import numpy as np


class RunningStats:
    """Count, mean and sum of squared deviations per model; no history kept.

    `std` and `known` are cached for the router's hot path and refreshed by `add` and
    `load_arrays` (the only writers; the cache is derived, never saved)."""

    def __init__(self, n_models: int) -> None:
        self.count = np.zeros(n_models, dtype=np.int64)
        self.mean = np.zeros(n_models)
        self.m2 = np.zeros(n_models)
        self._std: np.ndarray | None = None
        self._known = False

    def add(self, model: int, value: float) -> None:
        self.count[model] += 1
        delta = value - self.mean[model]
        self.mean[model] += delta / self.count[model]
        self.m2[model] += delta * (value - self.mean[model])
        self._std = None
        if not self._known:
            self._known = bool((self.count > 0).all())

    def std(self) -> np.ndarray:
        if self._std is None:
            self._std = np.sqrt(self.m2 / np.maximum(self.count - 1, 1))
        return self._std.copy()

    def known(self) -> bool:
        """True when every model has at least one observation."""
        return self._known

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_count": self.count, f"{prefix}_mean": self.mean, f"{prefix}_m2": self.m2}

    def load_arrays(self, prefix: str, arrays: dict[str, np.ndarray]) -> None:
        for name, value in self.arrays(prefix).items():
            if arrays[name].shape != value.shape or arrays[name].dtype != value.dtype:
                raise ValueError(f"{name}: shape {arrays[name].shape}, expected {value.shape}")
        self.count = arrays[f"{prefix}_count"].copy()
        self.mean = arrays[f"{prefix}_mean"].copy()
        self.m2 = arrays[f"{prefix}_m2"].copy()
        self._std = None
        self._known = bool((self.count > 0).all())


class EnergyHead:
    """Per-request joules: `E_m(x) = mean_m * exp(g_m . x)`, online least squares on the log
    ratio (AdaGrad), on the same hashed features as the satisfaction head.

    Joules depend on the request (prompt length, how long the answer runs, which kind of task):
    on the MESS+ traces a yes/no question costs a third of a science question on the same
    model, which changes which upgrade is worth its joules. The log ratio to the running mean
    keeps the head a correction that starts at zero and cannot go negative or explode
    (clipped to a factor of e^3 either way).
    """

    CLIP = 3.0

    def __init__(self, n_models: int, dim: int, learning_rate: float = 0.05) -> None:
        self.learning_rate = learning_rate
        self.weights = np.zeros((n_models, dim))
        self.grad_sq = np.full((n_models, dim), 1e-8)

    @property
    def weights(self) -> np.ndarray:
        """(n_models, dim) view of the weights, stored feature-major (dim, n_models) so that a
        request's weights of every model share cache lines; saved as (n_models, dim) C-order."""
        return self._weights_t.T

    @weights.setter
    def weights(self, value: np.ndarray) -> None:
        self._weights_t = np.array(value.T, order="C")  # a copy, feature-major

    def factors(self, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
        """Multiplier of each model's mean joules for the request with features (idx, val)."""
        # the same (n_models, nnz) Fortran-order operand as `weights[:, idx]`: the same BLAS call
        g = self._weights_t.take(idx, axis=0).T @ val
        np.maximum(g, -self.CLIP, out=g)  # np.clip, without its overhead
        np.minimum(g, self.CLIP, out=g)
        return np.exp(g, out=g)

    def update(self, idx: np.ndarray, val: np.ndarray, model: int, ratio: float) -> None:
        """Learn that this request cost `ratio` times the model's mean joules."""
        target = float(np.clip(np.log(max(ratio, 1e-9)), -self.CLIP, self.CLIP))
        err = float(self.weights[model, idx] @ val) - target
        g_vec = err * val
        acc = self.grad_sq[model, idx] + g_vec * g_vec
        self.grad_sq[model, idx] = acc
        self.weights[model, idx] -= self.learning_rate * g_vec / np.sqrt(acc)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"energy_head_weights": np.ascontiguousarray(self.weights),
                "energy_head_grad_sq": self.grad_sq}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name, value in self.arrays().items():
            if arrays[name].shape != value.shape or arrays[name].dtype != value.dtype:
                raise ValueError(f"{name}: shape {arrays[name].shape}, expected {value.shape}")
        self.weights = arrays["energy_head_weights"]  # the setter copies
        self.grad_sq = arrays["energy_head_grad_sq"].copy()
