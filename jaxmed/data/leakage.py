"""Leakage check: the same scan in train and in val/test, found by decoded-pixel hash (exact) and by 64-bit DCT
perceptual hash within a Hamming distance (near: re-encoded, resized, slightly edited copies), reported to JSON.

BRISC 2025 has exact duplicates across train/test; a model that memorises them inflates test accuracy.
Brain slices look alike at low frequencies, so distinct images can share a pHash within 4 bits (on 1,000
synthetic phantoms: 90 of 500k pairs). Each pHash match is therefore confirmed by the correlation of the two
32×32 thumbnails the hash is computed from: ≥ 0.9996 for JPEG re-encodes (quality 60), resizes and
brightness/contrast edits, ≤ 0.982 for those look-alikes; CONFIRM = 0.99 sits between.

At CheXpert size (224k images) comparing every pair is 10^10 comparisons and millions of candidate pairs, so
pairs within the threshold are found by multi-index hashing (Norouzi et al. 2012): the 64 bits are cut into
threshold + 1 bands, and two hashes within `threshold` bits agree exactly on at least one band (pigeonhole), so
only images sharing a band value are compared. Candidates and their thumbnail confirmation are streamed in chunks,
so memory stays bounded whatever N.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import cv2
import numpy as np
from PIL import Image

# the calibration split (data.calibration_fraction) too: a conformal guarantee needs calibration images the model
# has not memorised, and test images unlike both
PAIRS = (("train", "val"), ("train", "calibration"), ("train", "test"), ("val", "test"), ("calibration", "test"))
EXAMPLES = 10  # example pairs per kind in the report
CONFIRM = 0.99  # minimum thumbnail correlation of a near-duplicate pair
CHUNK_PAIRS = 1 << 20  # candidate pairs compared at once (bounds the index's memory)
CONFIRM_CHUNK = 4096  # near pairs whose thumbnails are correlated at once (4096 × 2 × 4 KiB float32)
MAX_BANDS = 16  # above this threshold bands would be too short to index: compare all pairs in chunks


def fingerprint(image: Image.Image) -> tuple[str, np.uint64, np.ndarray]:
    """(decoded-pixel hash, 64-bit pHash, the 32×32 gray thumbnail that confirms pHash matches)."""
    pixels = np.asarray(image)
    exact = hashlib.blake2b(str(pixels.shape).encode() + pixels.tobytes(), digest_size=16).hexdigest()
    thumbnail = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0))
    return exact, phash(thumbnail), thumbnail


def phash(thumbnail: np.ndarray) -> np.uint64:
    """64-bit DCT pHash (as imagehash.phash): of a 32×32 gray image, the 8×8 lowest DCT frequencies above their
    median."""
    low = cv2.dct(thumbnail.astype(np.float32))[:8, :8]
    bits = (low > np.median(low)).reshape(-1)
    return np.packbits(bits).view(">u8")[0].astype(np.uint64)


def check(rows: dict[str, np.ndarray], pixel_hashes: list, phashes: np.ndarray, thumbnails: np.ndarray,
          ids: list[str], threshold: int) -> tuple[dict, np.ndarray]:
    """→ (report, train rows that duplicate a val or test image). `rows` are item indices per split."""
    report = {"near_duplicate_threshold": threshold, "confirming_correlation": CONFIRM, "pairs": {}}
    leaked, hashes = [], np.asarray(pixel_hashes)
    for first, second in PAIRS:
        if first not in rows or second not in rows:
            continue
        exact = _exact_pairs(rows[first], rows[second], pixel_hashes)
        candidates = _near_pairs(rows[first], rows[second], phashes, threshold) if threshold >= 0 else _NONE
        near = _confirmed(candidates, hashes, thumbnails)
        report["pairs"][f"{first}-{second}"] = {
            "exact": len(exact), "near": len(near), "near_candidates": len(candidates),
            f"{first}_images_involved": len({a for a, _ in exact} | {a for a, _, _ in near}),
            "exact_examples": [{first: ids[a], second: ids[b]} for a, b in exact[:EXAMPLES]],
            "near_examples": [{first: ids[a], second: ids[b], "hamming": int(distance)}
                              for a, b, distance in sorted(near, key=lambda pair: pair[2])[:EXAMPLES]]}
        if first == "train":
            leaked += [a for a, _ in exact] + [a for a, _, _ in near]
    leaked = np.unique(np.asarray(leaked, np.int64))
    report["train_images_duplicating_val_or_test"] = len(leaked)
    return report, leaked


def _exact_pairs(first: np.ndarray, second: np.ndarray, pixel_hashes: list) -> list[tuple[int, int]]:
    by_hash = defaultdict(list)
    for row in second:
        by_hash[pixel_hashes[row]].append(int(row))
    return [(int(a), b) for a in first for b in by_hash.get(pixel_hashes[a], ())]


def _confirmed(pairs: np.ndarray, pixel_hashes: np.ndarray, thumbnails: np.ndarray) -> list:
    """The (a, b, distance) pairs that are not exact duplicates and whose 32×32 thumbnails correlate ≥ CONFIRM,
    CONFIRM_CHUNK pairs at a time (thumbnails may be a memory map: only each chunk's rows are read)."""
    kept = []
    for start in range(0, len(pairs), CONFIRM_CHUNK):
        chunk = pairs[start:start + CONFIRM_CHUNK]
        chunk = chunk[pixel_hashes[chunk[:, 0]] != pixel_hashes[chunk[:, 1]]]  # exact pairs are counted as such
        if not len(chunk):
            continue
        first, second = np.unique(chunk[:, 0]), np.unique(chunk[:, 1])  # sorted reads of a memory map
        a_thumbs, b_thumbs = (_standardised(thumbnails[rows]) for rows in (first, second))
        a_rows, b_rows = np.searchsorted(first, chunk[:, 0]), np.searchsorted(second, chunk[:, 1])
        correlation = np.einsum("ij,ij->i", a_thumbs[a_rows], b_thumbs[b_rows]) / a_thumbs.shape[1]
        kept += [(int(a), int(b), int(distance)) for a, b, distance in chunk[correlation >= CONFIRM]]
    return kept


def _standardised(images: np.ndarray) -> np.ndarray:
    """(n, 32, 32) → (n, 1024) float32, each row of mean 0 and standard deviation 1 (reduced as rows: 2× faster
    than over the last two axes, and the same numbers)."""
    values = images.reshape(len(images), -1).astype(np.float32)
    mean, std = values.mean(axis=1, keepdims=True), values.std(axis=1, keepdims=True)
    return (values - mean) / np.maximum(std, 1e-3)


def _near_pairs(first: np.ndarray, second: np.ndarray, phashes: np.ndarray, threshold: int):
    """All (first item, second item, distance) within `threshold` bits, by multi-index hashing."""
    a_hashes, b_hashes = phashes[first].astype(np.uint64), phashes[second].astype(np.uint64)
    bands = threshold + 1
    if bands > MAX_BANDS or not len(first) or not len(second):
        return _all_pairs_within(first, second, a_hashes, b_hashes, threshold)
    edges = np.linspace(0, 64, bands + 1).astype(np.uint64)
    masks = [np.uint64((1 << int(high - low)) - 1) << low for low, high in zip(edges[:-1], edges[1:])]
    found = []
    for band, mask in enumerate(masks):
        a_keys, b_keys = a_hashes & mask, b_hashes & mask
        order = np.argsort(b_keys, kind="stable")
        sorted_keys = b_keys[order]
        low = np.searchsorted(sorted_keys, a_keys, "left")
        counts = np.searchsorted(sorted_keys, a_keys, "right") - low
        ends = np.cumsum(counts)
        start = 0
        while start < len(first):  # as many first rows as give about CHUNK_PAIRS candidates
            stop = max(start + 1, int(np.searchsorted(ends, ends[start] - counts[start] + CHUNK_PAIRS, "right")))
            row_counts = counts[start:stop]
            a = np.repeat(np.arange(start, stop), row_counts)
            if len(a):
                row_starts = np.cumsum(row_counts) - row_counts
                offsets = np.arange(len(a)) - np.repeat(row_starts, row_counts)  # position within its bucket
                b = order[np.repeat(low[start:stop], row_counts) + offsets]
                difference = a_hashes[a] ^ b_hashes[b]
                distance = np.bitwise_count(difference)
                keep = distance <= threshold
                for earlier in masks[:band]:  # a pair that agrees on an earlier band was found there
                    keep &= (difference & earlier) != 0
                found.append(np.stack([a[keep], b[keep], distance[keep].astype(np.int64)], axis=1))
            start = stop
    return _as_pairs(first, second, found)


def _all_pairs_within(first, second, a_hashes, b_hashes, threshold: int):
    chunk = max(1, CHUNK_PAIRS // max(1, len(second)))
    found = []
    for start in range(0, len(first), chunk):
        distances = np.bitwise_count(a_hashes[start:start + chunk, None] ^ b_hashes[None, :])
        a, b = np.nonzero(distances <= threshold)
        found.append(np.stack([a + start, b, distances[a, b].astype(np.int64)], axis=1))
    return _as_pairs(first, second, found)


def _as_pairs(first, second, found: list) -> np.ndarray:
    """(K, 3) int64 rows (first item, second item, distance), in the order of a row-major scan of all pairs."""
    if not found:
        return _NONE
    pairs = np.concatenate(found).reshape(-1, 3)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    return np.stack([np.asarray(first)[pairs[:, 0]], np.asarray(second)[pairs[:, 1]], pairs[:, 2]], axis=1)


_NONE = np.zeros((0, 3), np.int64)


def shared_patients(rows: dict[str, np.ndarray], groups: np.ndarray, ids: list[str], pattern: str) -> dict:
    """Patients (data.group_pattern ids) with images on both sides of each pair of splits, by id — the leakage
    that pixel hashes cannot see (another scan of the same patient)."""
    report = {"group_pattern": pattern, "patients_per_split": {}, "pairs": {}}
    members = {split: {} for split in rows}
    for split, split_rows in rows.items():
        for row in split_rows:
            members[split].setdefault(groups[row], []).append(ids[row])
        report["patients_per_split"][split] = len(members[split])
    for first, second in PAIRS:
        if first not in rows or second not in rows:
            continue
        shared = sorted(set(members[first]) & set(members[second]))
        report["pairs"][f"{first}-{second}"] = {
            "shared_patients": len(shared),
            f"{first}_images_involved": sum(len(members[first][patient]) for patient in shared),
            "examples": [{"patient": patient, first: members[first][patient][:3], second: members[second][patient][:3]}
                         for patient in shared[:EXAMPLES]]}
    return report
