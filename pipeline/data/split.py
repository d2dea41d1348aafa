"""Patient-level splitting: a patient's images all land in one split, so nothing leaks into evaluation."""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from pipeline.errors import DataError

SPLITS = ("train", "val", "test")


def pseudonymise(identifier: str, salt: str) -> str:
    """Keyed hash (HMAC-SHA256) of a patient identifier: stable for a salt, not reversible without it."""
    digest = hmac.new(salt.encode(), identifier.encode(), hashlib.sha256).hexdigest()
    return f"p{digest[:12]}"


def _allocate(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Counts of (val, test) for a stratum of ``n`` patients; train keeps at least one when n > 0."""
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    while n_test + n_val >= n and n > 0 and (n_test or n_val):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def split_by_patient(
    patients: Mapping[str, bool], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Assign each patient to train/val/test, stratified on whether the patient has any lesion.

    Deterministic for a seed; independent of the mapping's order.
    """
    rng = np.random.default_rng(seed)
    strata: dict[bool, list[str]] = defaultdict(list)
    for pid in sorted(patients):
        strata[bool(patients[pid])].append(pid)
    assignment: dict[str, str] = {}
    for positive in (True, False):
        group = strata.get(positive, [])
        order = [group[i] for i in rng.permutation(len(group))]
        n_val, n_test = _allocate(len(order), val_fraction, test_fraction)
        for i, pid in enumerate(order):
            assignment[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment


def assert_no_leakage(rows: Iterable[tuple[str, str]]) -> None:
    """Raise if any patient appears in more than one split. ``rows`` are (patient, split) pairs."""
    splits_of: dict[str, set[str]] = defaultdict(set)
    for patient, split in rows:
        splits_of[patient].add(split)
    leaked = {p: sorted(s) for p, s in splits_of.items() if len(s) > 1}
    if leaked:
        examples = ", ".join(f"{p} in {s}" for p, s in list(leaked.items())[:5])
        raise DataError(f"{len(leaked)} patients appear in more than one split (leakage): {examples}")
