"""Leakage check: the same scan in train and in val/test, found by decoded-pixel hash (exact) and by 64-bit DCT
perceptual hash within a Hamming distance (near: re-encoded, resized, slightly edited copies), reported to JSON.

BRISC 2025 has exact duplicates across train/test; a model that memorises them inflates test accuracy.
Brain slices look alike at low frequencies, so distinct images can share a pHash within 4 bits (on 1,000
synthetic phantoms: 90 of 500k pairs). Each pHash match is therefore confirmed by the correlation of the two
32×32 thumbnails the hash is computed from: ≥ 0.9996 for JPEG re-encodes (quality 60), resizes and
brightness/contrast edits, ≤ 0.982 for those look-alikes; CONFIRM = 0.99 sits between.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import cv2
import numpy as np
from PIL import Image

PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))
EXAMPLES = 10  # example pairs per kind in the report
CONFIRM = 0.99  # minimum thumbnail correlation of a near-duplicate pair


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
    leaked = []
    for first, second in PAIRS:
        if first not in rows or second not in rows:
            continue
        exact = _exact_pairs(rows[first], rows[second], pixel_hashes)
        near = _near_pairs(rows[first], rows[second], phashes, threshold) if threshold >= 0 else []
        exact_set = {(a, b) for a, b in exact}
        near = _confirmed([(a, b, distance) for a, b, distance in near if (a, b) not in exact_set], thumbnails)
        report["pairs"][f"{first}-{second}"] = {
            "exact": len(exact), "near": len(near),
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


def _confirmed(pairs: list, thumbnails: np.ndarray) -> list:
    if not pairs:
        return pairs
    first, second = (np.asarray([pair[side] for pair in pairs]) for side in (0, 1))
    correlation = np.mean(_standardised(thumbnails[first]) * _standardised(thumbnails[second]), axis=(1, 2))
    return [pair for pair, value in zip(pairs, correlation) if value >= CONFIRM]


def _standardised(images: np.ndarray) -> np.ndarray:
    values = images.astype(np.float32)
    mean, std = values.mean(axis=(1, 2), keepdims=True), values.std(axis=(1, 2), keepdims=True)
    return (values - mean) / np.maximum(std, 1e-3)


def _near_pairs(first: np.ndarray, second: np.ndarray, phashes: np.ndarray, threshold: int):
    """All pairs within `threshold` bits, by brute force in chunks (5000×1000 images take milliseconds)."""
    a_hashes, b_hashes = phashes[first], phashes[second]
    chunk = max(1, 2**24 // max(1, len(second)))
    pairs = []
    for start in range(0, len(first), chunk):
        distances = np.bitwise_count(a_hashes[start:start + chunk, None] ^ b_hashes[None, :])
        a, b = np.nonzero(distances <= threshold)
        pairs += [(int(first[start + i]), int(second[j]), int(distances[i, j])) for i, j in zip(a, b)]
    return pairs


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
