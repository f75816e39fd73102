"""Satisfaction predictor: hashed word/char n-grams into an online logistic head per model.

FastText-like features cost microseconds and need no model files; the head learns from the few
labels MESS+ sees. Probabilities are Platt-calibrated online on prequential predictions
(predicted before the label trains the head), because the router compares probabilities with
energies, so calibration matters more than accuracy.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
_M64 = np.uint64(0x9E3779B97F4A7C15)
_P1 = np.uint64(0x100000001B3)
_SALT_CHAR = np.uint64(0x243F6A8885A308D3)
_SALT_WORD = np.uint64(0x13198A2E03707344)
_SALT_BIGRAM = np.uint64(0xA4093822299F31D0)
_SALT_LEN = np.uint64(0x082EFA98EC4E6C89)


@dataclass(frozen=True)
class Features:
    """Sparse feature vector: sorted unique indices and L2-normalised values."""

    idx: np.ndarray
    val: np.ndarray


def _mix(h: np.ndarray, salt: np.uint64, shift: np.uint64) -> np.ndarray:
    return ((h ^ salt) * _M64) >> shift


def featurize(text: str, dim_bits: int) -> Features:
    """Hash char 3-grams, words, word bigrams and a length bucket of `text` into 2**dim_bits."""
    shift = np.uint64(64 - dim_bits)
    low = text.lower()
    data = np.frombuffer(low.encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    parts: list[np.ndarray] = []
    with np.errstate(over="ignore"):
        if data.size >= 3:
            grams = (data[:-2] * _P1 + data[1:-1]) * _P1 + data[2:]
            parts.append(_mix(grams, _SALT_CHAR, shift))
        words = _WORD.findall(low)
        if words:
            wh = np.fromiter((zlib.crc32(w.encode()) for w in words), np.uint64, len(words))
            parts.append(_mix(wh, _SALT_WORD, shift))
            if len(words) > 1:
                parts.append(_mix(wh[:-1] * _P1 + wh[1:], _SALT_BIGRAM, shift))
        bucket = np.uint64(int(np.log2(len(text) + 1)))
        parts.append(_mix(np.array([bucket], np.uint64), _SALT_LEN, shift))
    idx, counts = np.unique(np.concatenate(parts).astype(np.int64), return_counts=True)
    val = counts.astype(np.float64)
    val /= np.sqrt(val @ val)
    return Features(idx, val)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


class Predictor:
    """Online logistic regression per model (optionally with a shared weight row), AdaGrad.

    logit_m(x) = logit(r_m) + (w_shared + w_m) . x, where r_m is the model's running
    success rate: the head learns only the per-request deviation, so with uninformative text it
    falls back to the unbiased running mean instead of noise. The rates are chained: model m's
    prior is model m-1's rate plus `prior_step`, worth `prior_strength` labels, so a dearer model
    seen a few times is not written off on bad luck (that would starve it for good).
    With calibration the head's weight a_m is learned (see `predict`).
    All parameters are plain float64 arrays, so the state file round-trips them bit-exactly.
    """

    _CAL_LR = 0.05

    def __init__(
        self,
        n_models: int,
        *,
        dim_bits: int = 16,
        learning_rate: float = 0.2,
        shared: bool = True,
        calibration: bool = True,
        prior_strength: float = 2.0,
        prior_step: float = 0.0,
        prior_floor: bool = False,
    ) -> None:
        self.prior_floor = prior_floor
        self.n_models = n_models
        self.dim_bits = dim_bits
        self.learning_rate = learning_rate
        self.shared = shared
        self.calibration = calibration
        self.prior_strength = prior_strength
        self.prior_step = prior_step
        rows = n_models + 1
        dim = 1 << dim_bits
        self.weights = np.zeros((rows, dim))  # row 0: shared, row 1 + m: model m
        self.grad_sq = np.full((rows, dim), 1e-8)
        self.calib = np.zeros(n_models)  # a_m: weight of the text head
        self.labels = np.zeros(n_models, dtype=np.int64)
        self.hits = np.zeros(n_models)
        self._refresh_rates()

    def _refresh_rates(self) -> None:
        rates = np.empty(self.n_models)
        prior, strength = 0.5, 2.0
        for m in range(self.n_models):
            if self.prior_floor and self.prior_step > 0.0 and m > 0:  # a floor, not a pull
                rates[m] = max((self.hits[m] + 1.0) / (self.labels[m] + 2.0), prior)
            else:
                rates[m] = (self.hits[m] + strength * prior) / (self.labels[m] + strength)
            if self.prior_step > 0.0:  # chained prior; prior_step 0 keeps every Beta(1, 1)
                prior = min(rates[m] + self.prior_step, 0.999)
                strength = self.prior_strength
        self.rates = np.clip(rates, 1e-3, 1.0 - 1e-3)
        self._base = np.log(self.rates / (1.0 - self.rates))

    def uncertainty(self, t: int) -> np.ndarray:
        """UCB width of each model's running success rate after t requests:
        sqrt(ln(1 + t) / (n + 2)); it grows with t, so a starved model is retried."""
        return np.sqrt(np.log1p(t) / (self.labels + 2.0))

    def featurize(self, text: str) -> Features:
        return featurize(text, self.dim_bits)

    def residuals(self, features: Features) -> np.ndarray:
        """Per-request deviation from each model's running rate, in logits (the text head)."""
        w = self.weights[:, features.idx] @ features.val
        own = w[1:]
        return own + w[0] if self.shared else own

    def predict(self, features: Features) -> np.ndarray:
        """Satisfaction probability per model: `sigmoid(logit(r_m) + a_m * residual_m)`.

        Without calibration a_m = 1; with it, a_m in [0, 1] is learned online from prequential
        predictions, starting at 0: the text head only counts once it has proved predictive, so
        noise in it cannot bias decisions (a noisy spread inflates the typical prediction).
        """
        resid = self.residuals(features)
        return _sigmoid(self._base + (self.calib * resid if self.calibration else resid))

    def update(self, features: Features, model: int, label: float) -> None:
        """One prequential step for `model` with `label` in [0, 1]."""
        resid = float(self.residuals(features)[model])
        base = float(self._base[model])
        if self.calibration:
            a = float(self.calib[model])
            g = float(_sigmoid(np.array(base + a * resid))) - label
            self.calib[model] = min(1.0, max(0.0, a - self._CAL_LR * g * resid))
        grad = float(_sigmoid(np.array(base + resid))) - label
        lr = self.learning_rate
        g_vec = grad * features.val
        g_sq = g_vec * g_vec
        rows = (0, model + 1) if self.shared else (model + 1,)
        for row in rows:
            acc = self.grad_sq[row, features.idx] + g_sq
            self.grad_sq[row, features.idx] = acc
            self.weights[row, features.idx] -= lr * g_vec / np.sqrt(acc)
        self.labels[model] += 1
        self.hits[model] += label
        self._refresh_rates()

    def arrays(self) -> dict[str, np.ndarray]:
        """Parameters for the state file."""
        return {
            "pred_weights": self.weights, "pred_grad_sq": self.grad_sq, "pred_calib": self.calib,
            "pred_labels": self.labels, "pred_hits": self.hits,
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of `arrays`; shapes must match (checked by the caller's state loader)."""
        for name, value in self.arrays().items():
            if arrays[name].shape != value.shape or arrays[name].dtype != value.dtype:
                raise ValueError(
                    f"{name}: shape {arrays[name].shape} {arrays[name].dtype}, "
                    f"expected {value.shape} {value.dtype}"
                )
        self.weights = arrays["pred_weights"].copy()
        self.grad_sq = arrays["pred_grad_sq"].copy()
        self.calib = arrays["pred_calib"].copy()
        self.labels = arrays["pred_labels"].copy()
        self.hits = arrays["pred_hits"].copy()
        self._refresh_rates()
