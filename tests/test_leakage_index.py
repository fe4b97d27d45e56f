"""The indexed near-duplicate search finds exactly the pairs of a brute-force scan of all pairs, and confirming
them streams thumbnails in chunks, so memory stays bounded however many candidates there are."""

import tracemalloc

import numpy as np
import pytest

from jaxmed.data import leakage


def brute_force(first, second, phashes, threshold):
    """Textbook: the Hamming distance of every pair (the check before the index)."""
    distances = np.bitwise_count(phashes[first][:, None] ^ phashes[second][None, :])
    a, b = np.nonzero(distances <= threshold)
    return [(int(first[i]), int(second[j]), int(distances[i, j])) for i, j in zip(a, b)]


def clustered_hashes(rng, count, clusters):
    """Hashes near a few centres (as look-alike brain slices), so many pairs fall within a few bits."""
    centres = rng.integers(0, 2**63, clusters, dtype=np.int64).astype(np.uint64)
    hashes = centres[rng.integers(0, clusters, count)]
    for _ in range(3):  # flip up to 3 random bits
        bits = rng.integers(0, 64, count).astype(np.uint64)
        hashes ^= np.where(rng.random(count) < 0.7, np.uint64(1) << bits, np.uint64(0))
    return hashes


@pytest.mark.parametrize("threshold", [0, 1, 4, 6, 20])
def test_index_finds_the_pairs_of_a_brute_force_scan(threshold):
    rng = np.random.default_rng(threshold)
    phashes = np.concatenate([clustered_hashes(rng, 1500, 40),
                              rng.integers(0, 2**63, 1500, dtype=np.int64).astype(np.uint64)])
    rows = rng.permutation(3000)
    first, second = rows[:2200], rows[2200:]
    expected = brute_force(first, second, phashes, threshold)
    found = [tuple(int(value) for value in pair) for pair in leakage._near_pairs(first, second, phashes, threshold)]
    assert len(expected) > 20 and found == expected


def test_check_confirms_in_bounded_memory_with_the_same_result():
    # 250 × 250 images with the same pHash: 62,500 candidates. Confirming them all at once (the check before the
    # index) held ~1 GB of float32 thumbnails; the chunked confirmation holds a few MB.
    rng = np.random.default_rng(0)
    count = 500
    thumbnails = rng.integers(0, 256, (count, 32, 32), dtype=np.uint8)
    thumbnails[250:260] = thumbnails[:10]  # ten true near duplicates across the splits
    phashes = np.full(count, 12345, np.uint64)
    pixel_hashes = [f"h{index}" for index in range(count)]
    pixel_hashes[255] = pixel_hashes[5]  # one of them an exact duplicate: counted as exact, not near
    ids = [f"image{index}" for index in range(count)]
    rows = {"train": np.arange(250), "test": np.arange(250, count)}
    tracemalloc.start()
    report, leaked = leakage.check(rows, pixel_hashes, phashes, thumbnails, ids, threshold=4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 150 * 2**20, peak
    found = report["pairs"]["train-test"]
    assert (found["exact"], found["near"]) == (1, 9)
    assert leaked.tolist() == list(range(10))


def test_candidates_that_are_all_exact_duplicates_are_not_near_duplicates():
    thumbnails = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    thumbnails[2:] = thumbnails[:2]
    report, leaked = leakage.check({"train": np.arange(2), "test": np.arange(2, 4)}, ["a", "b", "a", "b"],
                                   np.zeros(4, np.uint64), thumbnails, list("wxyz"), threshold=4)
    assert (report["pairs"]["train-test"]["exact"], report["pairs"]["train-test"]["near"]) == (2, 0)
    assert leaked.tolist() == [0, 1]
