"""Nested class-stratified subsamples (pipeline/data/subsample.py): prefixes are nested, stratified, deterministic."""

from __future__ import annotations

import random

import pytest

from pipeline.data.subsample import NEGATIVE, Unit, nested_order, take_count, take_fraction, units_from_images


def _dataset(seed: int, patients: int = 60) -> list[tuple[str, list[str]]]:
    rnd = random.Random(seed)
    rows = []
    for p in range(patients):
        for _ in range(rnd.randint(1, 4)):
            rows.append((f"p{p}", rnd.sample(["rbc", "wbc", "platelets"], rnd.randint(0, 2))))
    return rows


def test_units_group_images_and_count_negatives():
    units = {u.id: u for u in units_from_images([("a", ["x", "x"]), ("a", []), ("b", ["y"])])}
    assert units["a"].images == 2 and dict(units["a"].class_images) == {"x": 1, NEGATIVE: 1}
    assert units["b"].images == 1 and dict(units["b"].class_images) == {"y": 1}


@pytest.mark.parametrize("seed", range(5))
def test_prefixes_are_nested_and_stratified(seed):
    rows = _dataset(seed)
    units = units_from_images(rows)
    order = nested_order(units, seed)
    assert sorted(order) == sorted(u.id for u in units)
    total = sum(u.images for u in units)
    by_id = {u.id: u for u in units}
    chosen = [take_fraction(order, units, f) for f in (0.25, 0.5, 1.0)]
    assert set(chosen[0]) <= set(chosen[1]) <= set(chosen[2]) == set(by_id)
    for fraction, part in zip((0.25, 0.5), chosen, strict=False):
        images = sum(by_id[u].images for u in part)
        assert images >= fraction * total and images - by_id[part[-1]].images < fraction * total
        for name in ("rbc", "wbc", "platelets", NEGATIVE):
            whole = sum(u.class_images.get(name, 0) for u in units)
            got = sum(by_id[u].class_images.get(name, 0) for u in part)
            # within the largest unit (4 images) of the proportional count at this prefix size
            assert abs(got - whole * images / total) <= 4, (name, got, whole * images / total)


def test_one_image_units_are_within_one_image_of_proportional():
    rows = [(f"i{k}", ["rbc"] + (["wbc"] if k % 3 == 0 else [])) for k in range(90)]
    units = units_from_images(rows)
    order = nested_order(units, 0)
    for k in range(1, 91):
        got = sum(1 for u in order[:k] if int(u[1:]) % 3 == 0)
        assert abs(got - k / 3) <= 1


def test_order_is_deterministic_independent_of_input_order_and_seed_dependent():
    units = units_from_images(_dataset(1))
    a = nested_order(units, 7)
    assert a == nested_order(list(reversed(units)), 7)
    assert a != nested_order(units, 8)


def test_take_count_and_bad_values():
    order = nested_order([Unit(f"u{i}", 1, {"x": 1}) for i in range(10)], 0)
    assert take_count(order, 5) == order[:5] and set(take_count(order, 5)) <= set(take_count(order, 10))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            take_count(order, bad)
    with pytest.raises(ValueError, match="only 10"):
        take_count(order, 11)
    for bad in (0, 1.5, float("nan"), -0.1):
        with pytest.raises(ValueError):
            take_fraction(order, [Unit(u, 1) for u in order], bad)
    with pytest.raises(ValueError):
        nested_order([Unit("a", 1), Unit("a", 2)], 0)
    assert nested_order([], 0) == []
