"""OOD detectors against textbook computations on simulated Gaussian features: energy, Mahalanobis (scipy), RMDS,
ViM (an SVD route to the residual), KNN (brute force); a shifted cluster is found; the val threshold keeps
`ood_keep` of fresh in-distribution images; stored detectors round-trip without pickle; the generated probes."""

import json

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from jaxmed.errors import JaxmedError
from jaxmed.evaluate import ood

CLASSES, DIM = 3, 6


def _simulate(seed, per_class=300, shift=0.0):
    """Class-conditional Gaussians with one shared, correlated covariance, most of the variance in a few directions
    (as in a network's features); logits from a linear head."""
    rng = np.random.default_rng(seed)
    means = np.array([[3.0, 0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0]])
    mixing = np.eye(DIM) + 0.3 * np.random.default_rng(99).normal(size=(DIM, DIM))
    labels = np.repeat(np.arange(CLASSES), per_class)
    features = means[labels] + rng.normal(size=(len(labels), DIM)) * [1, 1, 1, .3, .3, .3] @ mixing + shift
    kernel = means.T + 0.3 * np.random.default_rng(7).normal(size=(DIM, CLASSES))  # roughly what training finds
    bias = np.array([0.1, -0.2, 0.3])
    return features, features @ kernel + bias, labels, kernel, bias


@pytest.fixture(scope="module")
def fitted():
    features, logits, labels, kernel, bias = _simulate(0)
    return ood.fit_detectors(features, logits, labels, kernel, bias, num_classes=CLASSES, knn_k=10), \
        (features, logits, labels, kernel, bias)


def test_energy_mahalanobis_and_rmds_equal_the_textbook(fitted):
    detectors, (features, logits, labels, _, _) = fitted
    queries, query_logits, *_ = _simulate(1, per_class=20, shift=0.5)
    scores = detectors.scores(queries, query_logits)
    np.testing.assert_allclose(scores["energy"], -np.log(np.exp(query_logits).sum(-1)), rtol=1e-10)
    means = [features[labels == c].mean(0) for c in range(CLASSES)]
    within = np.cov((features - np.asarray(means)[labels]).T, bias=True)  # pooled, maximum likelihood
    inverse, background_inverse = np.linalg.inv(within), np.linalg.inv(np.cov(features.T, bias=True))
    expected = np.array([min(mahalanobis(x, m, inverse) ** 2 for m in means) for x in queries])
    np.testing.assert_allclose(scores["mahalanobis"], expected, rtol=1e-8)
    background = np.array([mahalanobis(x, features.mean(0), background_inverse) ** 2 for x in queries])
    np.testing.assert_allclose(scores["rmds"], expected - background, rtol=1e-7, atol=1e-8)


def test_vim_and_knn_equal_the_textbook(fitted):
    detectors, (features, logits, _, kernel, bias) = fitted
    queries, query_logits, *_ = _simulate(2, per_class=20, shift=0.5)
    scores = detectors.scores(queries, query_logits)
    # ViM: the residual is what the top principal directions (right singular vectors around the origin) leave
    origin = np.linalg.lstsq(kernel.T, -bias, rcond=None)[0]  # minimum-norm solution of Wᵀu = −b: −pinv(Wᵀ) b
    principal = ood.vim_principal_dims(DIM, len(features))
    top = np.linalg.svd(features - origin, full_matrices=False)[2][:principal]

    def residual(x):
        centred = x - origin
        return np.sqrt(np.maximum(np.sum(centred**2, -1) - np.sum((centred @ top.T) ** 2, -1), 0))

    alpha = logits.max(-1).mean() / residual(features).mean()
    np.testing.assert_allclose(scores["vim"], alpha * residual(queries) - logsumexp(query_logits, -1), rtol=1e-7)
    bank = features / np.linalg.norm(features, axis=-1, keepdims=True)
    unit = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    tenth = np.array([np.sort(np.linalg.norm(bank - q, axis=-1))[9] for q in unit])
    np.testing.assert_allclose(scores["knn"], tenth, rtol=1e-6)  # the bank is stored in float32


def _auroc(detectors, inside, outside, name):
    inside_scores, outside_scores = detectors.scores(*inside)[name], detectors.scores(*outside)[name]
    return roc_auc_score(np.r_[np.zeros(len(inside_scores)), np.ones(len(outside_scores))],
                         np.r_[inside_scores, outside_scores])


def test_a_shifted_cluster_is_out_of_distribution(fitted):
    detectors, (*_, kernel, bias) = fitted
    inside = _simulate(3, per_class=100)[:2]
    # shifted along directions the classifier ignores: the same logits, so only the features can tell
    ignored = np.linalg.svd(kernel.T)[2][CLASSES:]  # orthonormal basis of the kernel's null space
    outside = _simulate(4, per_class=100, shift=8 * ignored.sum(0) / np.sqrt(len(ignored)))[:2]
    np.testing.assert_allclose(outside[1], _simulate(4, per_class=100)[1], atol=1e-9)
    for name in ("mahalanobis", "rmds", "vim", "knn"):  # the feature-based detectors
        assert _auroc(detectors, inside, outside, name) > 0.97, name
    assert 0.4 < _auroc(detectors, inside, outside, "energy") < 0.6  # energy sees only the logits
    weak = np.linalg.lstsq(kernel.T, -bias, rcond=None)[0] + 0.3 * np.random.default_rng(8).normal(size=(300, DIM))
    assert _auroc(detectors, inside, (weak, weak @ kernel + bias), "energy") > 0.97


@pytest.mark.parametrize("keep", [0.95, 0.8])
def test_the_val_threshold_keeps_ood_keep_of_fresh_in_distribution_images(fitted, keep):
    detectors, _ = fitted
    val, val_logits, *_ = _simulate(5, per_class=400)
    threshold = ood.threshold_at(detectors.scores(val, val_logits)["rmds"], keep)
    assert keep <= np.mean(detectors.scores(val, val_logits)["rmds"] <= threshold) <= keep + 1 / len(val)
    fresh, fresh_logits, *_ = _simulate(6, per_class=2000)
    kept = np.mean(detectors.scores(fresh, fresh_logits)["rmds"] <= threshold)
    # the val quantile's own sampling error (n = 1200) plus the fresh sample's (n = 6000), at about 4 sigma
    tolerance = 4 * np.sqrt(keep * (1 - keep) * (1 / 1200 + 1 / 6000))
    assert abs(kept - keep) <= tolerance, (kept, keep)
    with pytest.raises(JaxmedError, match="eval.ood_keep"):
        ood.threshold_at([1.0, 2.0], 1.5)


def test_stored_detectors_round_trip_without_pickle(fitted, tmp_path):
    detectors, (features, logits, *_) = fitted
    stored = ood.Fitted(detectors, "vim", {name: 1.5 for name in ood.DETECTORS}, {"checkpoint": "best/8"})
    ood.save(tmp_path / "ood", stored)
    loaded = ood.load(tmp_path / "ood")
    assert loaded.method == "vim" and loaded.meta == {"checkpoint": "best/8"}
    for name, value in detectors.scores(features, logits).items():
        np.testing.assert_array_equal(loaded.detectors.scores(features, logits)[name], value)
    scores, flags = loaded.score(features, logits)
    np.testing.assert_array_equal(flags, scores > 1.5)
    assert ood.load(tmp_path / "nothing") is None
    # an object array would need pickle: refused with one line naming the directory
    np.savez(tmp_path / "ood" / ood.ARRAYS_FILE, class_means=np.array([{"a": 1}], dtype=object))
    with pytest.raises(JaxmedError, match="cannot read the OOD detectors"):
        ood.load(tmp_path / "ood")
    (tmp_path / "bad").mkdir()
    ood.save(tmp_path / "bad", stored)
    meta = json.loads((tmp_path / "bad" / ood.META_FILE).read_text())
    (tmp_path / "bad" / ood.META_FILE).write_text(json.dumps(meta | {"method": "psychic"}))
    with pytest.raises(JaxmedError, match="method must be one of"):
        ood.load(tmp_path / "bad")


def test_default_methods_and_a_wrong_name():
    assert ood.default_method("vit") == "mahalanobis" and ood.default_method("resnet") == "vim"
    assert ood.default_method("resnet", "knn") == "knn"
    with pytest.raises(JaxmedError, match="eval.ood_method='psychic'"):
        ood.default_method("vit", "psychic")


def test_bad_ood_keys_fail_before_training(tmp_path):
    from helpers_configs import config_file
    from jaxmed import experiment

    config = config_file("tests/tiny_config.py")
    config.data.cache_dir = str(tmp_path / "cache")
    for key, value, message in (("ood_method", "psychic", "eval.ood_method='psychic'"),
                                ("ood_keep", 1.5, "eval.ood_keep=1.5")):
        bad = config.copy_and_resolve_references()
        bad.eval[key] = value
        with pytest.raises(JaxmedError, match=message):
            experiment.train_and_evaluate(bad, tmp_path / key)
        assert not (tmp_path / key / "checkpoints").exists()  # nothing trained


def test_probes_are_what_they_say():
    rng = np.random.default_rng(0)
    sources = np.repeat(rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8), 3, axis=-1)
    images, kinds = ood.far_ood_probes(sources, 4, seed=1, gray=True)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert kinds == [kind for kind in ood.PROBE_KINDS for _ in range(4)]
    assert np.all(images[..., 0] == images[..., 2])  # gray like the model's inputs
    flat = images[[i for i, kind in enumerate(kinds) if kind == "flat"]]
    assert all(len(np.unique(image)) == 1 for image in flat)
    for position, image in enumerate(images[[i for i, kind in enumerate(kinds) if kind == "patch_shuffled"]]):
        source = sources[position]
        assert not np.array_equal(image, source)
        patches = sorted(source[r:r + 8, c:c + 8].tobytes() for r in range(0, 32, 8) for c in range(0, 32, 8))
        assert sorted(image[r:r + 8, c:c + 8].tobytes() for r in range(0, 32, 8) for c in range(0, 32, 8)) == patches
    again, _ = ood.far_ood_probes(sources, 4, seed=1, gray=True)
    np.testing.assert_array_equal(images, again)  # seeded
    colour, _ = ood.far_ood_probes(sources, 2, seed=1, gray=False)
    assert np.any(colour[0, ..., 0] != colour[0, ..., 1])


def test_flag_rate_has_a_wilson_interval():
    rate = ood.flag_rate(np.array([True] * 5 + [False] * 95))
    assert rate["flagged"] == 5 and rate["rate"] == 0.05
    assert rate["ci95"] == pytest.approx([0.02154, 0.11175], abs=1e-4)  # Wilson 95% for 5/100


TINY_MODELS = {  # model type → (jaxmed class name, HF config kwargs); 3 classes each
    "vit": ("ViT", dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)),
    "cvt": ("CvT", dict(embed_dim=[16, 32], num_heads=[1, 2], depth=[1, 2], mlp_ratio=[4.0, 2.0],
                        patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], qkv_bias=[True, True],
                        cls_token=[False, True], qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3],
                        padding_kv=[1, 1], stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1],
                        drop_rate=[0.0, 0.0], attention_drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.1])),
    "resnet": ("ResNet", dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")),
    "efficientnet": ("EfficientNet", dict(width_coefficient=0.5, image_size=32, in_channels=[32, 16],
                                          out_channels=[16, 24], kernel_sizes=[3, 5], strides=[1, 2],
                                          num_block_repeats=[1, 1], expand_ratios=[1, 6], hidden_dim=640)),
    "jaxmed_sae": ("SAE", dict(image_size=32, hidden_sizes=[24, 12])),
}


def _positive_random_model(model_class, config):
    """Built abstractly and filled from numpy (no init program to compile), every weight positive so BatchNorm
    variances are valid and the pooled features are far from zero."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    for _, variable in state.flat_state():
        if isinstance(variable, nnx.RngKey):
            variable.value = jax.random.key(0)
        elif isinstance(variable, nnx.RngCount) or not jnp.issubdtype(variable.dtype, jnp.floating):
            variable.value = jnp.zeros(variable.shape, variable.dtype)
        else:
            fan_in = max(1, int(np.prod(variable.shape[:-1])))
            variable.value = jnp.asarray(rng.uniform(0.5, 1.5, variable.shape) / np.sqrt(fan_in), jnp.float32)
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


@pytest.mark.parametrize("model_type", TINY_MODELS)
def test_every_model_returns_the_features_its_classifier_reads(model_type):
    import jax.numpy as jnp
    from flax import nnx

    from jaxmed.models import MODELS

    config_class, model_class = MODELS[model_type]
    model = _positive_random_model(model_class, config_class(num_labels=3, **TINY_MODELS[model_type][1]))
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    @nnx.jit
    def forward(model, pixels):
        output = model.forward(pixels)
        return output.features, output.logits, model.classifier(output.features)

    features, logits, from_features = forward(model, pixels)
    assert features.ndim == 2 and features.shape[0] == 2 and np.all(np.isfinite(features))
    assert np.std(np.asarray(logits)) > 1e-3  # not a degenerate model whose logits are all alike
    np.testing.assert_allclose(from_features, logits, rtol=1e-5, atol=1e-6)
