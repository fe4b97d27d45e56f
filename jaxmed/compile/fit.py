"""The largest per-device batch that fits, in as few compiles as possible: each probe is a full compile (a minute or
more for a full-size model on a small CPU), so the bracket is narrowed by interpolation, not by halving.

A step's memory is close to affine in the batch (parameters and optimizer state are fixed, activations grow with
each image), so once two probes have a size the batch where the line meets the limit is usually within a few percent
of the edge: regula falsi instead of bisection. Interpolation never decides the answer, only where to probe: the
result is always a batch that was compiled and fits, with a compiled miss within `resolution` above it (or the cap).
"""

from __future__ import annotations

from typing import Callable

# a probe's outcome: (fits, size in bytes as the fit test measures it, or None when the compiler refused outright)
Probe = Callable[[int], "tuple[bool, float | None]"]


def largest_fitting(probe: Probe, start: int, limit: float, *, resolution: float, maximum: int, multiple: int = 1,
                    known: dict[int, tuple[bool, float | None]] | None = None) -> int:
    """The largest batch ≤ `maximum` for which `probe` fits, to within `resolution` of itself (0 when even 1 does
    not fit), a multiple of `multiple` unless even that does not fit. `limit` is the size the fit test allows, for
    the interpolation; `known` holds probes already made.

    Why multiples: a compiler's memory is not monotone in the batch at that scale — a per-device batch that pads to
    the next tile can need more than the tile-aligned one above it (libtpu: chestxray_vit's ViT-B/16 step fits a
    v5litepod-8 at 248 images per chip, 15.12 GiB, but the search among all integers found a miss below it)."""
    seen = dict(known or {})
    if 1 < multiple <= maximum:
        def coarse_probe(units: int) -> tuple[bool, float | None]:
            seen[units * multiple] = probe(units * multiple)
            return seen[units * multiple]

        units = largest_fitting(coarse_probe, max(1, start // multiple), limit, resolution=resolution,
                                maximum=maximum // multiple,
                                known={b // multiple: v for b, v in seen.items() if b % multiple == 0})
        if units:
            return units * multiple
        # even `multiple` does not fit: the largest smaller batch, any integer
        return largest_fitting(probe, multiple - 1, limit, resolution=resolution, maximum=multiple - 1, known=seen)

    def fits(batch: int) -> bool:
        if batch not in seen:
            seen[batch] = probe(batch)
        return seen[batch][0]

    def bracket() -> tuple[int | None, int | None]:
        low = max((b for b, (ok, _) in seen.items() if ok), default=None)
        high = min((b for b, (ok, _) in seen.items() if not ok and (low is None or b > low)), default=None)
        return low, high

    fits(start)
    width = None  # the bracket's width a round ago: a round that did not halve it is followed by a bisection
    for _ in range(64):  # each round probes a new batch inside the bracket
        low, high = bracket()
        if low is not None and (low >= maximum or (high is not None and high - low <= max(1, int(low * resolution)))):
            return min(low, maximum)
        if high == 1:
            return 0
        if low is None:  # nothing fits yet: below the smallest miss, by the line or by halving
            guess = _interpolate(seen, limit, low, high) or high // 2
            fits(min(guess, high - max(1, int(guess * resolution)), high - 1))
            continue
        if high is None:  # everything fits so far: above the largest fit, by the line or by doubling
            guess = _interpolate(seen, limit, low, high) or low * 2
            fits(min(max(guess, low + max(1, int(low * resolution))), maximum))
            continue
        guess = _interpolate(seen, limit, low, high)
        if guess is None or (width is not None and high - low > width / 2):
            guess = (low + high) // 2
        width = high - low
        step = max(1, int(low * resolution))
        # at least a step inside each end: a probe next to an end closes nothing the next probe would not
        guess = min(max(guess, low + step), high - step) if high - low > 2 * step else (low + high) // 2
        # a guess just below the edge is followed by one just above it (and the reverse): the bracket closes in two
        if fits(guess):  # (unless the fit itself closed the bracket: its resolution is relative to the new low)
            if guess + step < high and high - guess > max(1, int(guess * resolution)):
                fits(guess + step)
        elif guess - step > low:
            fits(guess - step)
    raise RuntimeError("the batch search did not converge")  # unreachable for a probe monotone in the batch


def _interpolate(seen: dict, limit: float, low: int | None, high: int | None) -> int | None:
    """Where the line through the two sized probes nearest the edge reaches `limit` (None when it cannot tell)."""
    sized = sorted((b, size) for b, (_, size) in seen.items() if size is not None)
    if len(sized) < 2:
        return None
    sizes = dict(sized)
    if low in sizes and high in sizes:  # regula falsi: the line through the bracket's ends
        (b1, s1), (b2, s2) = (low, sizes[low]), (high, sizes[high])
    else:
        edge = low if low is not None else high
        (b1, s1), (b2, s2) = sorted(sorted(sized, key=lambda p: abs(p[0] - edge))[:2])
    if s2 <= s1:
        return None
    guess = int(b1 + (limit - s1) * (b2 - b1) / (s2 - s1))
    if high is None:
        guess = min(guess, low * 4)  # a line from small batches may overshoot wildly: at most two doublings at once
    if low is None:
        guess = max(guess, high // 4)
    return max(guess, 1)
