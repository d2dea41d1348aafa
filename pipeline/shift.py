"""Is a set of images from another site? A two-sample test on model embeddings, numpy only.

Why this test: the kernel two-sample test (MMD², Gretton et al. 2012) compares whole distributions of embedding
vectors, needs no labels and no density model, and its permutation p-value is exact under the null (the pooled
sample is exchangeable when both samples come from one site), so the false-alarm rate is alpha by construction.

Choices, so results are reproducible and comparable:

- statistic: the unbiased estimate MMD²_u (it can be slightly negative when the samples agree);
- kernel: Gaussian RBF ``k(x, y) = exp(-|x - y|² / (2 bw²))``; the bandwidth ``bw`` is the median heuristic, the
  median pairwise Euclidean distance of the *pooled* sample (reference + target). The pooled sample does not change
  under a permutation, so the bandwidth is the same for every permutation and the test stays exact. A fixed
  ``bandwidth`` can be passed instead;
- p-value: ``(1 + #{permuted statistic >= observed}) / (1 + n_permutations)`` from seeded random relabellings;
- minimum: :data:`MIN_SAMPLES` embeddings on each side (see there).

Patients, not images, are the unit when they are known. Slices of one patient are far more alike than slices of
two patients, so images are not exchangeable: an image-level permutation splits each patient's slices between the
two samples and its null distribution is far narrower than the observed statistic's, and same-site images from
new patients are flagged (measured on the phantom: a 40-image test split against a 112-row reference gave
p = 0.001). With ``reference_groups`` / ``target_groups`` (a patient id per row) the test

- leaves out every pair of images of one patient from the within-sample means (they measure how alike one
  patient's slices are, not the sites; the within-group pairs of a sample are excluded like the diagonal of
  MMD²_u), so under the null "the target's patients come from the training site's population of patients" the
  statistic has mean zero however correlated a patient's slices are; and
- permutes whole patients between the samples (keeping the number of patients on each side), so its null
  distribution carries the between-patient variance the observed statistic has.

Rows without a group are their own group; with no groups at all this is exactly the image-level test (same
statistic, same random relabellings, same p-value). A reference and a target row are always different units,
even under equal labels. The result says which unit was permuted and how many units each side had.

:class:`ShiftMonitor` is the deployment side: a thread-safe window of the latest target embeddings whose result is
the same as :func:`mmd_test` on the reference and the window, recomputed at most every ``every`` additions, with the
reference's pairwise distances computed once. :func:`plot_projection` draws both samples in the plane of the pooled
sample's first two principal components (matplotlib, imported only when a picture is asked for).
"""

from __future__ import annotations

import io
import math
import threading
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DetflowError
from pipeline.fileio import atomic_write_bytes, atomic_write_json

METHOD = "mmd_rbf_permutation"
MIN_SAMPLES = 8
"""Fewest embeddings per sample. With 8 and 8 there are C(16, 8) = 12,870 distinct relabellings, so a p-value below
0.01 is reachable, and the unbiased within-sample means average 56 pairs; below that the test cannot flag anything
reliably, so it refuses rather than report a meaningless p-value. Power grows with n: 64 is the recommended target
size (acceptance: a site change gives p < 0.01 at 64)."""
DEFAULT_ALPHA = 0.05
DEFAULT_PERMUTATIONS = 1000
_CHUNK = 256  # permutations evaluated per matrix product (memory: CHUNK x N floats)


class ShiftError(DetflowError):
    """The samples cannot be compared (too few, mismatched dimensions, non-finite values)."""


@dataclass(frozen=True)
class ShiftResult:
    """One test's outcome; :meth:`to_dict` gives the ``shift.json`` document."""

    method: str
    statistic: float  # MMD²_u
    p_value: float
    alpha: float
    shifted: bool  # p_value < alpha
    n_reference: int
    n_target: int
    bandwidth: float
    n_permutations: int
    seed: int
    permutation_unit: str = "image"  # "patient" when groups were given: whole patients are permuted
    n_reference_groups: int | None = None  # units (patients, or images) on each side
    n_target_groups: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_shift_json(result: ShiftResult, path: str | Path, **extra: Any) -> Path:
    """Write ``shift.json`` atomically; ``extra`` keys (source, model sha256, ...) are appended."""
    return atomic_write_json(path, {**result.to_dict(), **extra})


def check_samples(reference: Any, target: Any, min_samples: int = MIN_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Both samples as float64 (n, d) arrays, or a :class:`ShiftError` saying what is wrong with them."""
    out = []
    for name, sample in (("reference", reference), ("target", target)):
        arr = np.asarray(sample, dtype=np.float64)
        if arr.ndim != 2:
            raise ShiftError(f"the {name} embeddings must be a 2-D array (samples x features), got shape {arr.shape}")
        if arr.shape[0] < min_samples:
            raise ShiftError(f"the {name} sample has {arr.shape[0]} embeddings; the shift test needs at least "
                             f"{min_samples} (64 recommended)")
        if arr.shape[1] < 1:
            raise ShiftError(f"the {name} embeddings have no features")
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr).all(axis=1)).sum())
            raise ShiftError(f"{bad} of {arr.shape[0]} {name} embeddings contain NaN or infinite values")
        out.append(arr)
    if out[0].shape[1] != out[1].shape[1]:
        raise ShiftError(f"embedding sizes differ: reference {out[0].shape[1]}, target {out[1].shape[1]} "
                         "(were they made by the same model?)")
    return out[0], out[1]


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances, (len(a), len(b)), clipped at 0 against rounding."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0)


def median_bandwidth(sq: np.ndarray) -> float:
    """Median heuristic from a square matrix of pooled squared distances: the median off-diagonal distance.

    When more than half of the pairs coincide (duplicated embeddings) the median is 0; the mean of the positive
    distances is used then, and 1.0 if every point is the same (the statistic is then 0 and p is 1).
    """
    n = sq.shape[0]
    off = np.sqrt(sq[np.triu_indices(n, k=1)])
    med = float(np.median(off)) if off.size else 0.0
    if med <= 0.0:
        pos = off[off > 0]
        med = float(pos.mean()) if pos.size else 1.0
    return med


def group_codes(reference_groups: Any, target_groups: Any, n_ref: int, n_tgt: int) -> np.ndarray:
    """One integer unit per pooled row (reference rows first): rows with the same group label on the same side share
    a unit; rows without a label (None, or no groups for that side) are units of their own. Reference and target
    units never coincide. Raises :class:`ShiftError` when a group list does not match its sample."""
    codes = np.empty(n_ref + n_tgt, dtype=np.int64)
    nxt = 0
    for name, groups, lo, n in (("reference", reference_groups, 0, n_ref), ("target", target_groups, n_ref, n_tgt)):
        if groups is None:
            codes[lo:lo + n] = np.arange(nxt, nxt + n)
            nxt += n
            continue
        labels = list(groups)
        if len(labels) != n:
            raise ShiftError(f"{len(labels)} {name} group ids for {n} {name} embeddings: one per embedding needed")
        seen: dict[Any, int] = {}
        for i, g in enumerate(labels):
            if g is None or (isinstance(g, str) and not g):
                codes[lo + i] = nxt
                nxt += 1
            else:
                if g not in seen:
                    seen[g] = nxt
                    nxt += 1
                codes[lo + i] = seen[g]
    return codes


def _mmd_permutation(sq: np.ndarray, codes: np.ndarray, n_ref: int, bandwidth: float, n_permutations: int,
                     seed: int) -> tuple[float, float]:
    """Observed statistic and permutation p-value from the pooled squared distances (reference rows first).

    Works on units (see :func:`group_codes`): kernel sums between units, within-unit pairs left out, relabellings
    of whole units keeping the number of reference units. With every row its own unit this is MMD²_u with
    image-level relabellings.
    """
    n = sq.shape[0]
    k = np.exp(sq * (-0.5 / (bandwidth * bandwidth)))
    k[codes[:, None] == codes[None, :]] = 0.0  # the diagonal and every within-unit pair
    n_units = int(codes.max()) + 1
    member = np.zeros((n_units, n))
    member[codes, np.arange(n)] = 1.0
    kg = member @ k @ member.T  # (units, units): kernel sums between units, zero diagonal
    size = member.sum(1)
    size2 = size * size
    sum_size2 = float(size2.sum())
    row = kg.sum(1)
    total = float(row.sum())
    ref_units = int(codes[:n_ref].max()) + 1  # reference units are numbered first: 0 .. ref_units - 1

    def stats(a: np.ndarray) -> np.ndarray:
        """The statistic for each row of ``a``, a 0/1 matrix marking the reference units of one labelling."""
        aka = np.einsum("pi,pi->p", a @ kg, a)
        ak1 = a @ row
        n_a = a @ size
        n_b = n - n_a
        sq_a = a @ size2
        pairs_rr = n_a * n_a - sq_a  # ordered pairs of rows of different units, within each sample
        pairs_tt = n_b * n_b - (sum_size2 - sq_a)
        return aka / pairs_rr + (total - 2.0 * ak1 + aka) / pairs_tt - 2.0 * (ak1 - aka) / (n_a * n_b)

    observed_a = np.zeros((1, n_units))
    observed_a[0, :ref_units] = 1.0
    observed = float(stats(observed_a)[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    done = 0
    while done < n_permutations:
        p = min(_CHUNK, n_permutations - done)
        order = rng.permuted(np.tile(np.arange(n_units), (p, 1)), axis=1)
        a = np.zeros((p, n_units))
        np.put_along_axis(a, order[:, :ref_units], 1.0, axis=1)
        # a tolerance of a few ulps: a relabelling equal to the observed one must count as >=, whatever the rounding
        exceed += int((stats(a) >= observed - 1e-12 * max(abs(observed), 1e-300)).sum())
        done += p
    return observed, (1 + exceed) / (1 + n_permutations)


def _validate_settings(alpha: float, n_permutations: int) -> None:
    if not 0.0 < alpha < 1.0:
        raise ShiftError(f"alpha must be in (0, 1), got {alpha}")
    if n_permutations < 1:
        raise ShiftError(f"n_permutations must be >= 1, got {n_permutations}")


def _check_units(codes: np.ndarray, n_ref: int, alpha: float) -> tuple[int, int]:
    """(reference units, target units); a :class:`ShiftError` when the patient-level test cannot reach ``alpha``."""
    units_r = len(np.unique(codes[:n_ref]))
    units_t = len(np.unique(codes[n_ref:]))
    for name, u in (("reference", units_r), ("target", units_t)):
        if u < 2:
            raise ShiftError(f"the {name} sample holds {u} patient(s); the shift test permutes whole patients and "
                             "needs at least 2 on each side (8 or more recommended)")
    if math.comb(units_r + units_t, units_t) * alpha < 1.0:
        raise ShiftError(f"{units_t} target and {units_r} reference patients allow only "
                         f"{math.comb(units_r + units_t, units_t)} distinct relabellings, too few for a p-value "
                         f"below alpha {alpha}; test images from more patients")
    return units_r, units_t


def mmd_test(reference: Any, target: Any, *, alpha: float = DEFAULT_ALPHA,
             n_permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0, bandwidth: float | None = None,
             min_samples: int = MIN_SAMPLES, reference_groups: Any = None, target_groups: Any = None) -> ShiftResult:
    """Two-sample MMD test of ``target`` against ``reference`` (both (n, d) embeddings).

    ``bandwidth``: None for the pooled median heuristic, else a fixed RBF bandwidth (> 0).
    ``reference_groups`` / ``target_groups``: a patient id per row (None: every row its own patient); with them the
    test permutes patients, see the module doc. Same inputs and seed give the same result. Raises
    :class:`ShiftError` on inputs the test cannot use.
    """
    ref, tgt = check_samples(reference, target, min_samples)
    _validate_settings(alpha, n_permutations)
    codes = group_codes(reference_groups, target_groups, len(ref), len(tgt))
    pooled = np.concatenate([ref, tgt])
    sq = squared_distances(pooled, pooled)
    return _result(sq, len(ref), alpha, n_permutations, seed, bandwidth, codes)


def _result(sq: np.ndarray, n_ref: int, alpha: float, n_permutations: int, seed: int,
            bandwidth: float | None, codes: np.ndarray | None = None) -> ShiftResult:
    if codes is None:
        codes = np.arange(sq.shape[0])
    grouped = len(np.unique(codes)) < len(codes)
    units_r, units_t = _check_units(codes, n_ref, alpha) if grouped else (n_ref, sq.shape[0] - n_ref)
    if bandwidth is None:
        bandwidth = median_bandwidth(sq)
    elif not (bandwidth > 0 and math.isfinite(bandwidth)):
        raise ShiftError(f"bandwidth must be a positive number, got {bandwidth}")
    stat, p = _mmd_permutation(sq, codes, n_ref, bandwidth, n_permutations, seed)
    return ShiftResult(method=METHOD, statistic=stat, p_value=p, alpha=alpha, shifted=p < alpha,
                       n_reference=n_ref, n_target=sq.shape[0] - n_ref, bandwidth=bandwidth,
                       n_permutations=n_permutations, seed=seed,
                       permutation_unit="patient" if grouped else "image",
                       n_reference_groups=units_r, n_target_groups=units_t)


class ShiftMonitor:
    """The service's view: the latest ``window`` target embeddings against a fixed reference.

    :meth:`add` is O(1) (a deque append under a lock). :meth:`current` recomputes only when at least ``every``
    embeddings arrived since the last result (or none was computed yet and the window holds ``min_samples``), so a
    busy service pays for one test per ``every`` requests, not per request; the reference's pairwise distances are
    computed once at construction (memory: 8 * n_reference² bytes, 2 MB for 512). The result equals
    :func:`mmd_test` ``(reference, window, seed=seed, n_permutations=n_permutations, alpha=alpha,
    reference_groups=reference_groups)``, so the service and the ``detflow shift`` command agree on the same
    embeddings (requests carry no patient id, so each window image is its own unit).
    """

    def __init__(self, reference: Any, *, window: int = 64, every: int = 16, alpha: float = DEFAULT_ALPHA,
                 n_permutations: int = 200, seed: int = 0, min_samples: int = MIN_SAMPLES,
                 reference_groups: Any = None) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        check_samples(ref, ref, min_samples)
        # requests carry no patient id: each window image is its own unit; the reference's patients are kept
        self._ref_codes = group_codes(reference_groups, None, len(ref), 0)
        _validate_settings(alpha, n_permutations)
        if window < min_samples:
            raise ShiftError(f"the shift window ({window}) must hold at least {min_samples} embeddings")
        if every < 1:
            raise ShiftError(f"shift recompute interval must be >= 1, got {every}")
        self.reference = ref
        self.window, self.every, self.alpha = window, every, alpha
        self.n_permutations, self.seed, self.min_samples = n_permutations, seed, min_samples
        self._sq_rr = squared_distances(ref, ref)
        self._norms_r = (ref * ref).sum(1)
        self._buffer: deque[np.ndarray] = deque(maxlen=window)
        self._since = 0
        self._seen = 0
        self._result: ShiftResult | None = None
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return int(self.reference.shape[1])

    def add(self, embeddings: Any) -> None:
        """Append one embedding (d,) or a batch (k, d); non-finite or wrongly sized ones raise :class:`ShiftError`."""
        arr = np.asarray(embeddings, dtype=np.float64)
        arr = arr[None, :] if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ShiftError(f"embedding of shape {np.shape(embeddings)} does not match the reference size {self.dim}")
        if not np.isfinite(arr).all():
            raise ShiftError("embedding contains NaN or infinite values")
        with self._lock:
            self._buffer.extend(arr)
            self._since += len(arr)
            self._seen += len(arr)

    def window_embeddings(self) -> np.ndarray:
        with self._lock:
            return np.array(self._buffer) if self._buffer else np.empty((0, self.dim))

    def current(self) -> ShiftResult | None:
        """The latest result, recomputed if due; None while the window holds fewer than ``min_samples``."""
        with self._lock:
            due = len(self._buffer) >= self.min_samples and (self._result is None or self._since >= self.every)
            if not due:
                return self._result
            tgt = np.array(self._buffer)
            self._since = 0
            # computed under the lock: concurrent callers wait for one computation instead of repeating it
            self._result = self._compute(tgt)
            return self._result

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/shift`` and ``/metrics`` report: the window state and the latest result (or null)."""
        result = self.current()
        with self._lock:
            n_window, seen = len(self._buffer), self._seen
        return {"window": self.window, "n_window": n_window, "n_seen": seen, "every": self.every,
                "min_samples": self.min_samples, "result": result.to_dict() if result else None}

    def _compute(self, tgt: np.ndarray) -> ShiftResult:
        n = len(self.reference)
        norms_t = (tgt * tgt).sum(1)
        sq_rt = np.maximum(self._norms_r[:, None] + norms_t[None, :] - 2.0 * (self.reference @ tgt.T), 0.0)
        sq_tt = squared_distances(tgt, tgt)
        sq = np.empty((n + len(tgt),) * 2)
        sq[:n, :n] = self._sq_rr
        sq[:n, n:] = sq_rt
        sq[n:, :n] = sq_rt.T
        sq[n:, n:] = sq_tt
        codes = np.concatenate([self._ref_codes, self._ref_codes.max() + 1 + np.arange(len(tgt))])
        return _result(sq, n, self.alpha, self.n_permutations, self.seed, None, codes)


def project_2d(reference: Any, target: Any) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Both samples in the plane of the pooled sample's first two principal components.

    Returns the two (n, 2) coordinate arrays and the fraction of the pooled variance each axis explains.
    """
    ref, tgt = check_samples(reference, target, min_samples=1)
    pooled = np.concatenate([ref, tgt])
    centred = pooled - pooled.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:  # one feature: a flat second axis
        comps = np.vstack([comps, np.zeros_like(comps)])
    var = s**2
    frac = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    explained = (float(frac[0]) if frac.size else 0.0, float(frac[1]) if frac.size > 1 else 0.0)
    coords = centred @ comps.T
    return coords[: len(ref)], coords[len(ref):], explained


def plot_projection(reference: Any, target: Any, path: str | Path, *, result: ShiftResult | None = None,
                    labels: tuple[str, str] = ("reference (training)", "target")) -> Path:
    """Write a PNG scatter of both samples on the first two principal axes (atomically); returns ``path``.

    Needs matplotlib (installed with the ``train`` extra, not in the serving image): a :class:`ShiftError` says so.
    """
    ref2, tgt2, explained = project_2d(reference, target)
    from pipeline.ultralytics_env import configure_environment

    configure_environment()  # MPLCONFIGDIR inside the project, before matplotlib reads it
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ShiftError("the shift picture needs matplotlib, which this environment lacks "
                         "(install detflow[train])") from None
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    try:
        ax.scatter(ref2[:, 0], ref2[:, 1], s=10, alpha=0.5, c="tab:blue", label=f"{labels[0]} (n={len(ref2)})")
        ax.scatter(tgt2[:, 0], tgt2[:, 1], s=14, alpha=0.8, c="tab:orange", marker="^",
                   label=f"{labels[1]} (n={len(tgt2)})")
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
        title = "Embeddings, pooled PCA"
        if result is not None:
            title += f"\nMMD² {result.statistic:.4g}, p = {result.p_value:.3g}" + (" (shifted)" if result.shifted
                                                                                     else "")
        ax.set_title(title)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
