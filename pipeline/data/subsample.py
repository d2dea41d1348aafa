"""Nested, class-stratified subsamples: the data-fraction axis of a study and the K images of few-shot fine-tuning.

A subsample is a *prefix* of one deterministic order of units (patients, or images when every image is its own
unit), so subsamples are nested by construction: the 25 % patients are inside the 50 %, the 5 few-shot images are
inside the 10. The order is built greedily so that every prefix keeps each class's share of images as close to the
whole set's share as the units allow (images with no box count as one more class, so negatives stay proportional).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

NEGATIVE = "__no_box__"  # the pseudo-class of an image without boxes


@dataclass(frozen=True)
class Unit:
    """One unit of sampling: ``images`` images, of which ``class_images[c]`` contain class ``c``."""

    id: str
    images: int
    class_images: Mapping[str, int] = field(default_factory=dict)


def units_from_images(rows: Iterable[tuple[str, Iterable[str]]]) -> list[Unit]:
    """Group images into units. ``rows`` are ``(unit id, class names of one image's boxes)``, one per image."""
    images: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    for unit, classes in rows:
        unit = str(unit)
        present = set(classes) or {NEGATIVE}
        images[unit] = images.get(unit, 0) + 1
        per = counts.setdefault(unit, {})
        for name in present:
            per[name] = per.get(name, 0) + 1
    return [Unit(u, images[u], counts[u]) for u in sorted(images)]


def nested_order(units: Sequence[Unit], seed: int) -> list[str]:
    """A deterministic order of ``units`` whose every prefix is as class-stratified as the units allow.

    Greedy: at each step the unit that brings the prefix's per-class image counts closest (least squares, each class
    weighted by 1 / its total) to the whole set's proportions is appended; ties go to a seeded random order, so two
    seeds give two different, equally stratified orders. Independent of the input's order.
    """
    if not units:
        return []
    ids = sorted(u.id for u in units)
    if len(set(ids)) != len(ids):
        raise ValueError("nested_order: unit ids must be unique")
    by_id = {u.id: u for u in units}
    rng = np.random.default_rng(seed)
    shuffled = [ids[i] for i in rng.permutation(len(ids))]
    classes = sorted({c for u in units for c in u.class_images})
    n = np.array([by_id[i].images for i in shuffled], dtype=float)
    w = np.array([[by_id[i].class_images.get(c, 0) for c in classes] for i in shuffled], dtype=float)
    if w.size == 0:
        w = np.zeros((len(shuffled), 1))
    totals = np.maximum(w.sum(axis=0), 1.0)
    share = w.sum(axis=0) / max(n.sum(), 1.0)
    have = np.zeros(w.shape[1])
    taken_images = 0.0
    remaining = np.ones(len(shuffled), dtype=bool)
    order: list[str] = []
    for _ in range(len(shuffled)):
        after = have[None, :] + w  # per-class counts if each candidate were taken next
        target = (taken_images + n)[:, None] * share[None, :]
        cost = (((after - target) ** 2) / totals[None, :]).sum(axis=1)
        cost[~remaining] = np.inf
        pick = int(np.argmin(cost))  # argmin keeps the first (seeded) among equal costs
        remaining[pick] = False
        have += w[pick]
        taken_images += n[pick]
        order.append(shuffled[pick])
    return order


def take_fraction(order: Sequence[str], units: Sequence[Unit], fraction: float) -> list[str]:
    """The shortest prefix of ``order`` holding at least ``fraction`` of all images (at least one unit)."""
    if not 0 < fraction <= 1 or not math.isfinite(fraction):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    images = {u.id: u.images for u in units}
    total = sum(images[i] for i in order)
    need = fraction * total - 1e-9
    taken, count = [], 0
    for unit in order:
        if taken and count >= need:
            break
        taken.append(unit)
        count += images[unit]
    return taken


def take_count(order: Sequence[str], k: int) -> list[str]:
    """The first ``k`` units of ``order`` (few-shot: K images, nested across K)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of units must be a positive integer, got {k!r}")
    if k > len(order):
        raise ValueError(f"asked for {k} units, but only {len(order)} are available")
    return list(order[:k])


def take_images(order: Sequence[str], units: Sequence[Unit], k: int) -> list[str]:
    """The shortest prefix of ``order`` holding at least ``k`` images (few-shot's K images when units are patients
    with several images: a patient is taken whole, so none of its images is left to be scored); with one image per
    unit it is :func:`take_count`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of images must be a positive integer, got {k!r}")
    images = {u.id: u.images for u in units}
    total = sum(images[i] for i in order)
    if k > total:
        raise ValueError(f"asked for {k} images, but only {total} are available")
    taken, count = [], 0
    for unit in order:
        if count >= k:
            break
        taken.append(unit)
        count += images[unit]
    return taken
