"""Running mean and spread per model (Welford), for energy and latency estimates."""

from __future__ import annotations

import numpy as np


class RunningStats:
    """Count, mean and sum of squared deviations per model; no history kept."""

    def __init__(self, n_models: int) -> None:
        self.count = np.zeros(n_models, dtype=np.int64)
        self.mean = np.zeros(n_models)
        self.m2 = np.zeros(n_models)

    def add(self, model: int, value: float) -> None:
        self.count[model] += 1
        delta = value - self.mean[model]
        self.mean[model] += delta / self.count[model]
        self.m2[model] += delta * (value - self.mean[model])

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.count - 1, 1))

    def known(self) -> bool:
        """True when every model has at least one observation."""
        return bool((self.count > 0).all())

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_count": self.count, f"{prefix}_mean": self.mean, f"{prefix}_m2": self.m2}

    def load_arrays(self, prefix: str, arrays: dict[str, np.ndarray]) -> None:
        for name, value in self.arrays(prefix).items():
            if arrays[name].shape != value.shape or arrays[name].dtype != value.dtype:
                raise ValueError(f"{name}: shape {arrays[name].shape}, expected {value.shape}")
        self.count = arrays[f"{prefix}_count"].copy()
        self.mean = arrays[f"{prefix}_mean"].copy()
        self.m2 = arrays[f"{prefix}_m2"].copy()
