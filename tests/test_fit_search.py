"""The largest-batch search (jaxmed/compile/fit.py) against memory curves with a known edge: its answer is always a
batch that fits with a miss within the resolution above it, and on the near-affine curves compilers give it needs
fewer probes (each a full compile) than doubling and bisecting."""

import math

import numpy as np
import pytest

from jaxmed.compile.fit import largest_fitting

GIB = 2**30
LIMIT = 0.95 * 16 * GIB
CURVES = {  # memory per device against the per-device batch
    "affine (ViT-B/16 on v5e)": lambda b: 2.5 * GIB + 0.05 * GIB * b,
    "affine, large HBM": lambda b: 2.5 * GIB + 0.008 * GIB * b,
    "convex": lambda b: GIB + 0.01 * GIB * b + 1e-4 * GIB * b * b,
    "concave": lambda b: GIB + 2 * GIB * math.sqrt(b),
    "staircase (padding to 8)": lambda b: GIB + 0.06 * GIB * 8 * math.ceil(b / 8),
    "fixed cost near the limit": lambda b: 15 * GIB + 0.001 * GIB * b,
    "tiny model": lambda b: 0.1 * GIB + 1e-4 * GIB * b,
    "nothing fits": lambda b: 20 * GIB + b,
    "only a few images fit": lambda b: 14 * GIB + 0.3 * GIB * b,
    # a batch that is no multiple of 8 pads to the next tile and takes more than the aligned batch above it
    "padding penalty": lambda b: 3 * GIB + 0.05 * GIB * b + (0.6 * GIB if b % 8 else 0),
}
RESOLUTION, MAXIMUM = 1 / 16, 1 << 14


def search(curve, start=256, refuse_over=None, multiple=1):
    """The search against `curve`; a size over `refuse_over` is a compiler refusal (libtpu's out of memory: no
    size)."""
    probes = []

    def probe(batch):
        assert batch >= 1 and batch not in probes, "a batch is compiled at most once"
        probes.append(batch)
        size = curve(batch)
        if refuse_over is not None and size > refuse_over:
            return False, None
        return size <= LIMIT, size

    found = largest_fitting(probe, start, LIMIT, resolution=RESOLUTION, maximum=MAXIMUM, multiple=multiple)
    return found, probes


def bisection_probes(curve, start=256):
    """The compiles of doubling/halving from `start` then bisecting (the textbook search), for comparison."""
    seen = {}

    def fits(batch):
        seen.setdefault(batch, curve(batch) <= LIMIT)
        return seen[batch]

    if fits(start):
        low, high = start, None
        while high is None and low < MAXIMUM:
            low, high = (low * 2, None) if fits(low * 2) else (low, low * 2)
        if high is None:
            return len(seen)
    else:
        high, low = start, start // 2
        while low >= 1 and not fits(low):
            high, low = low, low // 2
        if low < 1:
            return len(seen)
    while high - low > max(1, int(low * RESOLUTION)):
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return len(seen)


def true_edge(curve, multiple=1):
    candidates = [b for b in range(1, MAXIMUM + 1) if b % multiple == 0 or b < multiple]
    return max((b for b in candidates if curve(b) <= LIMIT), default=0)


@pytest.mark.parametrize("name", CURVES)
@pytest.mark.parametrize("start", [5, 8, 256, 4096])
@pytest.mark.parametrize("refuse_over", [None, 17 * GIB])
@pytest.mark.parametrize("multiple", [1, 8])
def test_the_answer_fits_and_is_within_the_resolution_of_the_edge(name, start, refuse_over, multiple):
    curve = CURVES[name]
    found, probes = search(curve, start, refuse_over, multiple)
    if name == "padding penalty" and multiple == 1:
        return  # not monotone in the batch: see the next test
    edge = true_edge(curve, multiple if true_edge(curve) >= multiple else 1)
    if edge == 0:
        assert found == 0 and 1 in probes  # even one image was compiled and refused
        return
    step = max(multiple if found >= multiple else 1, int(found * RESOLUTION))
    assert found in probes and curve(found) <= LIMIT  # compiled, and it fits
    assert edge - step <= found <= edge
    if found >= multiple:
        assert found % multiple == 0
    if found < MAXIMUM:  # a compiled miss closes the bracket
        assert any(found < b <= found + step and curve(b) > LIMIT for b in probes)
    assert len(probes) <= 14


def test_batches_in_multiples_of_the_tile_find_the_aligned_edge_that_all_integers_miss():
    """Memory that is not monotone in the batch (padding to a tile): among all integers the search can close its
    bracket on a padded miss far below the edge; in multiples of 8 it finds the largest aligned batch that fits."""
    curve = CURVES["padding penalty"]
    aligned, probes = search(curve, 256, multiple=8)
    assert aligned == true_edge(curve, 8) == 240 and all(b % 8 == 0 for b in probes)
    anywhere, _ = search(curve, 256, multiple=1)
    assert anywhere < aligned


def test_affine_curves_need_fewer_compiles_than_bisection():
    counts = {name: (len(search(CURVES[name])[1]), bisection_probes(CURVES[name])) for name in CURVES}
    for name in ("affine (ViT-B/16 on v5e)", "affine, large HBM", "staircase (padding to 8)"):
        ours, theirs = counts[name]
        assert ours <= theirs - 2, counts
    assert sum(ours for ours, _ in counts.values()) < sum(theirs for _, theirs in counts.values()), counts


def test_probes_already_made_are_not_compiled_again():
    curve = CURVES["affine (ViT-B/16 on v5e)"]
    probes = []

    def probe(batch):
        probes.append(batch)
        return curve(batch) <= LIMIT, curve(batch)

    largest_fitting(probe, 256, LIMIT, resolution=RESOLUTION, maximum=MAXIMUM, known={256: (False, curve(256))})
    assert 256 not in probes


def test_a_fit_that_closes_the_bracket_ends_the_search():
    """libtpu's CvT-13 train step on a v6e-8 (GiB per chip as compiled at these batches; flat where the compiler
    rematerialises more as HBM runs out): 1120 fits and 1184 does not, within 1/16 of 1120 — the search ends there
    (it used to compile 1152 as well, minutes for nothing)."""
    compiled = {128: 7.22, 256: 14.18, 552: 28.46, 592: 28.17, 1120: 29.91, 1184: 30.67}
    limit = 0.95 * 32 * GIB
    probes = []

    def probe(batch):
        assert batch not in probes
        probes.append(batch)
        size = float(np.interp(batch, list(compiled), list(compiled.values()))) * GIB
        return size <= limit, size

    found = largest_fitting(probe, 128, limit, resolution=RESOLUTION, maximum=MAXIMUM, multiple=8,
                            known={128: (True, 7.22 * GIB)})
    assert found == 1120 and probes == [256, 552, 592, 1184, 1120]
