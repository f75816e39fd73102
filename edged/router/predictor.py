"""Satisfaction predictor: per model, a Bayesian mixture of four experts (running rate, a hashed
n-gram + shape-token logistic head, the next cheaper model's prediction plus a paired gain, and
the labels of the most shape-alike remembered requests).

The features cost microseconds and need no model files; each expert is weighted by how well it
predicted the model's past labels before seeing them (prequential log-loss), because the router
compares probabilities with energies, so calibration matters more than accuracy.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"\d+")
_DIGIT = re.compile(r"\d")
_SENTENCE = re.compile(r"[.!?](?:\s|$)")
_M64 = np.uint64(0x9E3779B97F4A7C15)
_P1 = np.uint64(0x100000001B3)
_SALT_CHAR = np.uint64(0x243F6A8885A308D3)
_SALT_WORD = np.uint64(0x13198A2E03707344)
_SALT_BIGRAM = np.uint64(0xA4093822299F31D0)
_SALT_LEN = np.uint64(0x082EFA98EC4E6C89)
_SALT_LEN_INT = int(_SALT_LEN)
_M64_INT = int(_M64)
_MASK64 = (1 << 64) - 1


#: dimensions of the dense shape vector the neighbours expert compares requests by
SHAPE_DIM = 64


@dataclass(frozen=True)
class Features:
    """Sparse feature vector (sorted unique indices, L2-normalised values) and the request's
    shape tokens as a small dense unit vector (for the neighbours expert)."""

    idx: np.ndarray
    val: np.ndarray
    shape: np.ndarray = field(default_factory=lambda: np.zeros(SHAPE_DIM, np.float32))


def shape_tokens(text: str, words: list[str] | None = None) -> list[str]:
    """Words for what n-grams miss: how many numbers and how long each is, the text's length
    in words and characters, its first and last word, its closing character. Difficulty often
    lives there (a 4-digit sum, a yes/no question, a multi-sentence passage)."""
    if words is None:  # featurize passes the words it already found
        words = _WORD.findall(text.lower())
    numbers = _NUMBER.findall(text)
    tokens = [
        f"\x00nums:{min(len(numbers), 8)}",
        f"\x00words:{int(math.log2(len(words) + 1))}",
        f"\x00chars:{int(math.log2(len(text) + 1))}",
        f"\x00end:{text.rstrip()[-1:]}",
        f"\x00sentences:{min(len(_SENTENCE.findall(text)), 6)}",
    ]
    if words:  # digits folded to 9, so "12+34=" and "56+78=" share the shape "99"
        first, last = words[0], words[-1]
        if numbers:  # no digit in the text, none in its words (lowercasing makes none)
            first, last = _DIGIT.sub("9", first), _DIGIT.sub("9", last)
        tokens += [f"\x00first:{first}", f"\x00last:{last}"]
    lengths = sorted({min(len(n), 12) for n in numbers})
    tokens += [f"\x00digits:{n}" for n in lengths]
    if lengths:
        tokens.append(f"\x00maxdigits:{lengths[-1]}")
    return tokens


def featurize(text: str, dim_bits: int) -> Features:
    """Hash char 3-grams, words, word bigrams and shape tokens of `text` into 2**dim_bits.

    Each family is L2-normalised on its own and weighted (n-grams 1, shape 1), so a long text's
    hundreds of n-grams cannot drown the handful of shape tokens.
    """
    low = text.lower()
    words = _WORD.findall(low)
    # The shape tokens are a handful: hash them with Python ints (the same 64-bit
    # `((h ^ salt) * M64) >> shift` as the grams); colliding hashes sum their values in token order.
    bits = 64 - dim_bits
    shape: dict[int, float] = {}
    dense_counts: dict[int, int] = {}
    tokens = shape_tokens(text, words)
    value = 1.0 / math.sqrt(len(tokens))  # shape tokens are distinct: counts of 1
    for token in tokens:
        h = zlib.crc32(token.encode())
        i = (((h ^ _SALT_LEN_INT) * _M64_INT) & _MASK64) >> bits
        shape[i] = shape[i] + value if i in shape else value
        j = h % SHAPE_DIM
        dense_counts[j] = dense_counts.get(j, 0) + 1
    dense = np.zeros(SHAPE_DIM, dtype=np.float32)
    dense[list(dense_counts)] = list(dense_counts.values())
    # float32(sqrt) of an exact integer sum of squares: the float32 norm `sqrt(dense @ dense)`
    dense /= math.sqrt(sum(c * c for c in dense_counts.values()))
    keys = sorted(shape)
    shape_val = [shape[i] for i in keys]
    data = np.frombuffer(low.encode("utf-8"), dtype=np.uint8)  # widened by the uint64 ops
    n_tri = max(data.size - 2, 0)
    n_grams = n_tri + 2 * len(words) - 1 if words else n_tri
    if not n_grams:
        idx = np.array(keys, dtype=np.int64)
        val = np.array(shape_val)
        return Features(idx, val / np.sqrt(val @ val), dense)
    # Every gram family is salted in place in one buffer, then mixed (`* M64 >> shift`) in one pass
    # (uint64 arithmetic wraps silently); the distinct shape hashes follow.
    flat = np.empty(n_grams + len(keys), dtype=np.uint64)
    if n_tri:
        tri = flat[:n_tri]
        np.multiply(data[:-2], _P1, out=tri)
        tri += data[1:-1]
        tri *= _P1
        tri += data[2:]
        tri ^= _SALT_CHAR
    if words:
        wh = np.array([zlib.crc32(w.encode()) for w in words], dtype=np.uint64)
        np.bitwise_xor(wh, _SALT_WORD, out=flat[n_tri:n_tri + len(words)])
        bigram = flat[n_tri + len(words):n_grams]
        np.multiply(wh[:-1], _P1, out=bigram)
        bigram += wh[1:]
        bigram ^= _SALT_BIGRAM
    grams = flat[:n_grams]
    grams *= _M64
    grams >>= bits
    flat[n_grams:] = keys
    # One sort of gram and shape hashes gives the sorted union with counts; the shape hashes'
    # ones come off again, then each shape value is added before the gram value.
    flat.sort()
    edge = np.empty(flat.size + 1, dtype=bool)
    edge[0] = edge[-1] = True
    np.not_equal(flat[1:], flat[:-1], out=edge[1:-1])
    starts = edge.nonzero()[0]
    idx = flat.take(starts[:-1]).view(np.int64)  # hashes < 2**dim_bits: the same bits
    counts = starts[1:] - starts[:-1]
    at = idx.searchsorted(keys)
    counts[at] -= 1  # gram counts only (0 where only a shape token hashed)
    val = counts / math.sqrt(float(counts @ counts))  # an exact integer sum of squares
    val[at] = shape_val + val[at]  # x + 0.0 == x where no gram shares the hash
    val /= math.sqrt(val @ val)  # math.sqrt and np.sqrt both round correctly
    return Features(idx, val, dense)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


def _sigmoid_fresh(z: np.ndarray) -> np.ndarray:
    """`_sigmoid` of a float64 array the caller gives away (overwritten: fewer temporaries);
    the same operations on the same values, so bit-identical."""
    np.maximum(z, -30.0, out=z)
    np.minimum(z, 30.0, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    z += 1.0
    return np.divide(1.0, z, out=z)


#: The experts mixed per model (rows of `Predictor.loss`).
EXPERTS = ("rate", "head", "chain", "neighbours")


def _log_loss(p: float, label: float) -> float:
    p = min(max(p, 1e-6), 1.0 - 1e-6)
    return -(label * math.log(p) + (1.0 - label) * math.log(1.0 - p))


class Predictor:
    """Online logistic regression per model (optionally with a shared weight row), AdaGrad.

    logit_m(x) = logit(r_m) + (w_shared + w_m) . x, where r_m is the model's running
    success rate: the head learns only the per-request deviation, so with uninformative text it
    falls back to the unbiased running mean instead of noise. The rates are chained: model m's
    prior is model m-1's rate plus `prior_step`, worth `prior_strength` labels, so a dearer model
    seen a few times is not written off on bad luck (that would starve it for good).
    With calibration the head is one of two experts (see `predict`).
    All parameters are plain float64 arrays, so the state file round-trips them bit-exactly.
    """

    #: Labelled requests each model remembers for the neighbours expert, and how many of the
    #: nearest it averages.
    MEMORY = 256
    NEIGHBOURS = 16

    #: Per-label decay of the experts' log-loss: about the last 500 labels count, so
    #: the mixture can move back to the rate if the stream changes and the head goes stale.
    EVIDENCE_DECAY = 0.998

    def __init__(
        self,
        n_models: int,
        *,
        dim_bits: int = 16,
        extra_dim: int = 0,
        learning_rate: float = 0.2,
        shared: bool = True,
        calibration: bool = True,
        prior_strength: float = 2.0,
        prior_step: float = 0.0,
        prior_floor: bool = False,
        top_prior: float | None = None,
        experts: tuple[str, ...] = EXPERTS,
    ) -> None:
        unknown = set(experts) - set(EXPERTS)
        if unknown or not experts:
            raise ValueError(f"experts must be a non-empty subset of {EXPERTS}, got {experts}")
        #: experts left out of the mixture (weight 0): an ablation, or a user's choice
        self._off = np.array([[e not in experts] for e in EXPERTS])
        self.prior_floor = prior_floor
        self.top_prior = top_prior
        self.n_models = n_models
        self.dim_bits = dim_bits
        self.extra_dim = extra_dim
        self.learning_rate = learning_rate
        self.shared = shared
        self.calibration = calibration
        self.prior_strength = prior_strength
        self.prior_step = prior_step
        rows = n_models + 1
        dim = (1 << dim_bits) + extra_dim  # hashed text, then dense features (embeddings)
        self.weights = np.zeros((rows, dim))  # row 0: shared, row 1 + m: model m
        self.grad_sq = np.full((rows, dim), 1e-8)
        self.loss = np.zeros((len(EXPERTS), n_models))  # decayed prequential log-loss
        self.memory_shape = np.zeros((n_models, self.MEMORY, SHAPE_DIM), np.float32)
        self.memory_label = np.zeros((n_models, self.MEMORY))
        self.memory_n = np.zeros(n_models, dtype=np.int64)  # labels stored (ring: mod MEMORY)
        self.pair_n = np.zeros(n_models)  # requests where model m and m - 1 were both labelled
        self.pair_gain = np.zeros(n_models)  # sum of label_m - label_{m-1} over those
        self.labels = np.zeros(n_models, dtype=np.int64)
        self.hits = np.zeros(n_models)
        # start of each model's memory in the flattened (models * MEMORY) similarities
        self._row_starts = np.arange(0, n_models * self.MEMORY, self.MEMORY)[:, None]
        self._refresh_rates()

    def _refresh_rates(self) -> None:
        """Rates, their logits, and the caches `experts` reads (refreshed after every change of
        labels, losses, pairs or memory; derived, never saved)."""
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
        if self.top_prior is not None:  # the top model is the reference (agreement labels)
            top = self.n_models - 1
            rates[top] = (self.hits[top] + self.prior_strength * self.top_prior) / (
                self.labels[top] + self.prior_strength)
        self.rates = np.clip(rates, 1e-3, 1.0 - 1e-3)
        self._base = np.log(self.rates / (1.0 - self.rates))
        self._rates_list = self.rates.tolist()
        self._labels2_list = (self.labels + 2.0).tolist()
        self._rates2 = 2.0 * self.rates
        self._weights_list = self.expert_weights().tolist()
        self._gains_list = self.gains().tolist()
        # slots not yet filled, per model (None once every model's memory is full)
        empty = np.arange(self.MEMORY)[None, :] >= self.memory_n[:, None]
        self._memory_empty = empty if empty.any() else None

    @property
    def weights(self) -> np.ndarray:
        """(rows, dim) view of the head's weights, stored feature-major (dim, rows) so that a
        request's weights of every row share cache lines (`residuals` gathers one row of the
        storage per feature); the state file gets the (rows, dim) C-order array as always."""
        return self._weights_t.T

    @weights.setter
    def weights(self, value: np.ndarray) -> None:
        self._weights_t = np.array(value.T, order="C")  # a copy, feature-major

    def uncertainty(self, t: int) -> list[float]:
        """UCB width of each model's running success rate after t requests:
        sqrt(ln(1 + t) / (n + 2)); it grows with t, so a starved model is retried.
        Plain floats (a handful of models): numpy's log1p, then correctly rounded / and sqrt."""
        spread = float(np.log1p(t))
        return [math.sqrt(spread / n) for n in self._labels2_list]

    def featurize(self, text: str, embedding: np.ndarray | None = None) -> Features:
        """Hashed features of `text`, followed by `embedding` (extra_dim dense values, e.g. a
        sentence encoder's unit vector) when the predictor has such dimensions; each part
        carries half the squared norm, so neither drowns the other."""
        hashed = featurize(text, self.dim_bits)
        if embedding is None:
            return hashed
        base = 1 << self.dim_bits
        idx = np.concatenate([hashed.idx, base + np.arange(self.extra_dim)])
        val = np.concatenate([hashed.val, embedding / (np.linalg.norm(embedding) or 1.0)])
        return Features(idx, val / math.sqrt(2.0), hashed.shape)

    def residuals(self, features: Features) -> np.ndarray:
        """Per-request deviation from each model's running rate, in logits (the text head)."""
        # the same (rows, nnz) Fortran-order operand as `weights[:, idx]`, so the same BLAS call
        w = self._weights_t.take(features.idx, axis=0).T @ features.val
        own = w[1:]
        return own + w[0] if self.shared else own

    def expert_weights(self) -> np.ndarray:
        """Posterior weight of each expert (rows: EXPERTS) per model, from its decayed
        prequential log-loss: `softmax(-loss)` over the experts that are on."""
        loss = np.where(self._off, np.inf, self.loss)
        z = -(loss - loss.min(axis=0))
        w = np.exp(z)
        return w / w.sum(axis=0)

    def gains(self) -> np.ndarray:
        """Each model's satisfaction gain over the next cheaper one, from the requests where
        both were labelled (paired, so not biased by which requests each model is sent), with
        `prior_step` as a prior worth `prior_strength` pairs; 0 for the cheapest model. With
        `prior_floor`, never below 0: a dozen pairs from one run of hard requests once put the
        medium model 0.05 below the small one through the chain, and it was never served again
        (a run of one kind in `edged replay --blocks`), so it never got the pairs to recover."""
        gains = (self.pair_gain + self.prior_strength * self.prior_step) / (
            self.pair_n + self.prior_strength
        )
        gains[0] = 0.0
        if self.prior_floor:
            np.maximum(gains, 0.0, out=gains)
        return gains

    def experts(self, features: Features) -> np.ndarray:
        """Each expert's prediction per model (rows: EXPERTS) and the mixture (last row).

        rate: the model's running rate. head: `sigmoid(logit(r_m) + residual_m)`. neighbours:
        the labels of the remembered requests shaped most like this one. chain: the
        next cheaper model's mixture for this request plus the paired gain; a dear model runs
        on few, mostly hard requests, so its own rate and head see a biased sample while the
        cheaper model's well-fed head knows what kind of request this is.
        """
        out = np.empty((len(EXPERTS) + 1, self.n_models))
        out[0] = self.rates
        _sigmoid_fresh(np.add(self._base, self.residuals(features), out=out[1]))
        out[3] = self.neighbours(features.shape)
        # plain floats (cached by _refresh_rates): the loop below is scalar math
        w, gains, rates = self._weights_list, self._gains_list, self._rates_list
        heads, near = out[1].tolist(), out[3].tolist()
        unchained = 0 if self.top_prior is None else self.n_models - 1
        chains, mixes = [], []
        mixed = 0.0
        for m in range(self.n_models):
            chain = rates[m] if m in (0, unchained) else min(max(mixed + gains[m], 1e-3),
                                                            1.0 - 1e-3)
            mixed = w[0][m] * rates[m] + w[1][m] * heads[m] + w[2][m] * chain + w[3][m] * near[m]
            chains.append(chain)
            mixes.append(mixed)
        out[2] = chains
        out[4] = mixes
        return out

    def neighbours(self, shape: np.ndarray) -> np.ndarray:
        """Per model, the labels of the most similar remembered requests (cosine of the shape
        vectors, weighted by similarity squared), shrunk to the running rate with the weight of
        two labels: a few labels of requests shaped alike (a 3-digit sum, a yes/no question)
        say more than hundreds of n-gram weights can learn from them."""
        sims = self.memory_shape @ shape  # (models, MEMORY): one matmul for every model
        if self._memory_empty is not None:  # empty slots never count
            np.putmask(sims, self._memory_empty, -1.0)
        k = min(self.NEIGHBOURS, self.MEMORY)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top = top + self._row_starts  # flat indices: `take` is np.take_along_axis, cheaper
        w = sims.take(top)
        np.maximum(w, 0.0, out=w)
        np.square(w, out=w)
        hits = np.add.reduce(w * self.memory_label.take(top), axis=1)  # = .sum(axis=1)
        hits += self._rates2
        weight = np.add.reduce(w, axis=1)
        weight += 2.0
        return np.divide(hits, weight, out=hits)

    def predict(self, features: Features) -> np.ndarray:
        """Satisfaction probability per model.

        Without calibration: `sigmoid(logit(r_m) + residual_m)`. With it, a Bayesian mixture of
        three experts (see `experts`) weighted by how well each predicted this model's past
        labels before seeing them (prequential log-loss): a head with real signal takes over
        within a few dozen labels, one that only fits noise stays out, and a mixture of
        calibrated forecasts stays calibrated.
        """
        if not self.calibration:
            return _sigmoid_fresh(self._base + self.residuals(features))
        return self.experts(features)[-1]

    def observe_pair(self, model: int, label: float, cheaper_label: float) -> None:
        """Labels of `model` and of the next cheaper model on the same request."""
        self.pair_n[model] += 1.0
        self.pair_gain[model] += label - cheaper_label
        self._gains_list = self.gains().tolist()

    def update(
        self, features: Features, model: int, label: float, experts: np.ndarray | None = None
    ) -> None:
        """One prequential step for `model` with `label` in [0, 1]. `experts`: this request's
        `experts(features)` computed before any of its labels, when several arrive at once."""
        resid = float(self.residuals(features)[model])
        base = float(self._base[model])
        if self.calibration:
            if experts is None:
                experts = self.experts(features)
            preds = experts[: len(EXPERTS), model]
            losses = np.array([_log_loss(float(p), label) for p in preds])
            self.loss[:, model] = self.EVIDENCE_DECAY * self.loss[:, model] + losses
            slot = int(self.memory_n[model]) % self.MEMORY
            self.memory_shape[model, slot] = features.shape
            self.memory_label[model, slot] = label
            self.memory_n[model] += 1
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
            "pred_weights": np.ascontiguousarray(self.weights), "pred_grad_sq": self.grad_sq,
            "pred_loss": self.loss, "pred_labels": self.labels, "pred_hits": self.hits,
            "pred_memory_shape": self.memory_shape, "pred_memory_label": self.memory_label,
            "pred_memory_n": self.memory_n,
            "pred_pair_n": self.pair_n, "pred_pair_gain": self.pair_gain,
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of `arrays`; shapes must match (checked by the caller's state loader)."""
        for name, value in self.arrays().items():
            if arrays[name].shape != value.shape or arrays[name].dtype != value.dtype:
                raise ValueError(
                    f"{name}: shape {arrays[name].shape} {arrays[name].dtype}, "
                    f"expected {value.shape} {value.dtype}"
                )
        self.weights = arrays["pred_weights"]  # the setter copies
        self.grad_sq = arrays["pred_grad_sq"].copy()
        self.loss = arrays["pred_loss"].copy()
        self.memory_shape = arrays["pred_memory_shape"].copy()
        self.memory_label = arrays["pred_memory_label"].copy()
        self.memory_n = arrays["pred_memory_n"].copy()
        self.pair_n = arrays["pred_pair_n"].copy()
        self.pair_gain = arrays["pred_pair_gain"].copy()
        self.labels = arrays["pred_labels"].copy()
        self.hits = arrays["pred_hits"].copy()
        self._refresh_rates()
