"""Explanations: the pure rollout on hand-made attention, rollout and Grad-CAM maps on tiny models of each
architecture, the forward split Grad-CAM differentiates through, Grad-CAM finding trained evidence, the figures."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from transformers import CvtConfig, EfficientNetConfig, ResNetConfig, ViTConfig

from jaxmed.evaluate import explain
from jaxmed.errors import JaxmedError
from jaxmed.models import CvT, EfficientNet, ResNet, ViT

# Non-square images (height 32, width 48), so a transposed grid shows; six images, two of each of three classes,
# the batch every test uses so that compiled programs are shared.
HEIGHT, WIDTH, BATCH = 32, 48, 6
LABELS = np.array([0, 0, 1, 1, 2, 2])
CLASS_NAMES = ["glioma", "meningioma", "no_tumor"]

CVT = dict(embed_dim=[16, 32], num_heads=[1, 2], depth=[1, 2], mlp_ratio=[4.0, 2.0], patch_sizes=[7, 3],
           patch_stride=[4, 2], patch_padding=[2, 1], qkv_bias=[True, True], cls_token=[False, True],
           qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1], stride_kv=[2, 2],
           padding_q=[1, 1], stride_q=[1, 1], drop_rate=[0.0, 0.0], attention_drop_rate=[0.0, 0.0],
           drop_path_rate=[0.0, 0.1], num_labels=3)
EFFICIENTNET = dict(width_coefficient=0.5, depth_coefficient=1.0, image_size=64, in_channels=[32, 16],
                    out_channels=[16, 24], kernel_sizes=[3, 5], strides=[1, 2], num_block_repeats=[1, 2],
                    expand_ratios=[1, 6], hidden_dim=640, dropout_rate=0.2, drop_connect_rate=0.0, num_labels=3)
# name → (model constructor, the Grad-CAM feature grid and the rollout grid (None: no attention) for 32×48 images)
MODELS = {
    "vit": (lambda: ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, num_labels=3,
                                  hidden_dropout_prob=0.1), rngs=nnx.Rngs(0)), (4, 6), (4, 6)),
    # CvT-13's layout: a cls token in the last stage, whose keys/values are 2×3 against a 4×6 query grid.
    "cvt-cls": (lambda: CvT(CvtConfig(**CVT), rngs=nnx.Rngs(0)), (4, 6), (4, 6)),
    # No cls token (mean-pooled head) and the original CvT's ceil-mode average-pool keys (3×4 against 4×6).
    "cvt-avg": (lambda: CvT(CvtConfig(**dict(CVT, cls_token=[False, False], qkv_projection_method=["dw_bn", "avg"])),
                            rngs=nnx.Rngs(0)), (4, 6), (4, 6)),
    "resnet": (lambda: ResNet(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                           num_labels=3), rngs=nnx.Rngs(0)), (4, 6), None),
    "efficientnet": (lambda: EfficientNet(EfficientNetConfig(**EFFICIENTNET), rngs=nnx.Rngs(0)), (8, 12), None),
    "efficientnet-max": (lambda: EfficientNet(EfficientNetConfig(**dict(EFFICIENTNET, pooling_type="max")),
                                              rngs=nnx.Rngs(0)), (8, 12), None),
}


def random_model(build, seed: int = 0, gain: float = 1.5) -> nnx.Module:
    """The model `build()` makes, in train mode, with O(1) random weights and non-trivial BatchNorm statistics.

    HF's std-0.02 init leaves attention uniform and logits ~0, which would let a wrong forward split or a transposed
    map pass. Built abstractly and filled from numpy: initialising eagerly compiles one program per parameter shape
    (~13 s for the tiny CvT here).
    """
    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.RandomState(seed)
    for path, var in state.flat_state():
        if isinstance(var, nnx.RngKey):
            var.value = jax.random.key(seed)
        elif isinstance(var, nnx.RngCount) or path[-1] == "num_batches_tracked":
            var.value = jnp.zeros(var.shape, var.dtype)
        elif path[-1] == "mean":
            var.value = jnp.asarray(0.5 * rng.randn(*var.shape), jnp.float32)
        elif path[-1] == "var":
            var.value = jnp.asarray(0.5 + 1.5 * rng.rand(*var.shape), jnp.float32)
        elif path[-1] == "scale":
            var.value = jnp.asarray(1 + 0.2 * rng.randn(*var.shape), jnp.float32)
        elif len(var.shape) == 1:
            var.value = jnp.asarray(0.1 * rng.randn(*var.shape), jnp.float32)
        else:
            var.value = jnp.asarray(rng.randn(*var.shape) * gain / np.prod(var.shape[:-1]) ** 0.5, jnp.float32)
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=None)
def tiny_model(name: str) -> nnx.Module:
    """One model per name for the whole module; nothing in jaxmed.explain mutates a model."""
    return random_model(MODELS[name][0])


@pytest.fixture(scope="module")
def pixels():
    return jnp.asarray(np.random.RandomState(0).randn(BATCH, HEIGHT, WIDTH, 3).astype(np.float32))


@functools.partial(jax.jit, static_argnums=0)
def _forward_and_split(graphdef, state, pixels):
    """(the model's output with attentions, head(features(pixels)), the feature grid), in eval mode. Jitted: eager
    dispatch compiles every primitive for every shape, which is slower here than one program."""
    model = explain._eval_merge(graphdef, state)
    features_fn, head_fn = explain.feature_split(model)
    features = features_fn(model, pixels)
    return model.forward(pixels, output_attentions=True), head_fn(model, features), features.grid


# ------------------------------------------------------------------------------------------- the pure rollout


def _layer(matrix, heads=1, batch=1):
    """One layer's attention (B, heads, T, K) from one (T, K) matrix."""
    return np.broadcast_to(np.asarray(matrix, np.float64), (batch, heads) + np.shape(matrix))


def test_rollout_by_hand():
    # Layer 1: the CLS token reads patch 1 only; layer 2: CLS reads patch 1, patch 1 reads patch 2.
    first = [[0, 1, 0], [0, 1, 0], [0, 0, 1]]
    second = [[0, 1, 0], [0, 0, 1], [0, 0, 1]]
    np.testing.assert_allclose(explain.rollout([_layer(first)])[0],
                               [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]], atol=1e-7)
    # CLS after layer 2 = ½ CLS₁ + ½ patch1₁ = ½(½ CLS + ½ patch1) + ½ patch1. Reversing the layer order would give
    # [¼, ½, ¼]: patch 2 reaches CLS only through a later layer.
    joint = explain.rollout([_layer(first), _layer(second)])[0]
    np.testing.assert_allclose(joint[0], [0.25, 0.75, 0.0], atol=1e-7)
    np.testing.assert_allclose(joint.sum(-1), 1.0, atol=1e-6)


def test_rollout_head_fusion_and_discard():
    heads = np.stack([np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([[0.2, 0.8], [0.9, 0.1]])])[None]
    for fusion, fused in {"mean": [[0.4, 0.6], [0.6, 0.4]], "max": [[0.6, 0.8], [0.9, 0.7]],
                          "min": [[0.2, 0.4], [0.3, 0.1]]}.items():
        expected = np.asarray(fused) + np.eye(2)
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(explain.rollout([heads], head_fusion=fusion)[0], expected, atol=1e-6)
    # Discarding half of the four fused weights zeroes the two smallest (0.1, 0.2 under "min"): [[0, .4], [.3, 0]].
    expected = np.array([[1.0, 0.4], [0.3, 1.0]])
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(explain.rollout([heads], head_fusion="min", discard_ratio=0.5)[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="head_fusion"):
        explain.rollout([heads], head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        explain.rollout([heads], discard_ratio=1.0)


def test_rollout_of_identity_and_uniform_attention():
    tokens = 1 + 6
    # Identity attention mixes nothing: the joint attention is the identity, and the CLS token took nothing from
    # any patch, so its map is all zeros (not a made-up uniform map).
    joint = explain.rollout([_layer(np.eye(tokens), heads=2, batch=2)] * 3)
    np.testing.assert_allclose(joint, np.broadcast_to(np.eye(tokens), joint.shape), atol=1e-7)
    assert not explain.normalise_maps(joint[:, 0, 1:]).any()
    # Uniform attention: every patch reaches CLS equally, so the normalised map is uniform (all ones).
    joint = explain.rollout([_layer(np.full((tokens, tokens), 1 / tokens), heads=2, batch=2)] * 3)
    patches = joint[:, 0, 1:]
    np.testing.assert_allclose(patches, np.broadcast_to(patches[:, :1], patches.shape), rtol=1e-6)
    np.testing.assert_allclose(explain.normalise_maps(patches.reshape(2, 2, 3)), 1.0, rtol=1e-6)


def test_rollout_with_strided_keys():
    # CLS + two patches as queries; keys: CLS + one pooled token made from both patches.
    attention = _layer([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    key_map = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    mixed = np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]) + np.eye(3)
    np.testing.assert_allclose(explain.rollout([attention], key_map=key_map)[0],
                               mixed / mixed.sum(-1, keepdims=True), atol=1e-7)
    with pytest.raises(ValueError, match="key_map"):
        explain.rollout([attention])


def test_cvt_key_map_reads_the_projection_windows():
    config = CvtConfig(**CVT)
    assert explain.cvt_grids(config, (HEIGHT, WIDTH)) == [(8, 12), (4, 6)]
    # Keys of a 4×6 grid through a 3×3, stride-2, padding-1 window: 2×3 keys; key (0, 0) reads rows 0-1, cols 0-1.
    key_map = explain.cvt_key_map(config, 1, (4, 6), with_cls=True)
    assert key_map.shape == (1 + 2 * 3, 1 + 4 * 6)
    np.testing.assert_allclose(key_map.sum(1), 1.0)
    assert key_map[0, 0] == 1 and not key_map[0, 1:].any() and not key_map[1:, 0].any()
    first_key = key_map[1, 1:].reshape(4, 6)
    np.testing.assert_allclose(first_key[:2, :2], 0.25)
    assert not first_key[2:].any() and not first_key[:, 2:].any()
    last_key = key_map[-1, 1:].reshape(4, 6)  # key (1, 2): rows 1-3, cols 3-5
    np.testing.assert_allclose(last_key[1:, 3:], 1 / 9)
    assert not last_key[0].any() and not last_key[:, :3].any()
    # The original CvT's average pooling in ceil mode adds a last, partial window per axis: 3×4 keys.
    avg = CvtConfig(**dict(CVT, qkv_projection_method=["dw_bn", "avg"]))
    assert explain.cvt_key_map(avg, 1, (4, 6), with_cls=False).shape == (3 * 4, 4 * 6)


# --------------------------------------------------------------------------------------------------- on models


def test_rollout_maps_keep_the_grid_orientation(monkeypatch, pixels):
    """Token order → (row, column) on a non-square grid, with hand-made attention in place of the model's."""
    batch = len(pixels)
    # ViT, 4×6 patches: the CLS token reads only the patch at row 1, column 4 (token 1 + 1·6 + 4).
    attention = np.zeros((batch, 2, 25, 25))
    attention[:, :, :, 1 + 1 * 6 + 4] = 1.0
    monkeypatch.setattr(explain, "_attentions", lambda graphdef, state, pixels, head_fusion: [attention])
    maps = explain.attention_rollout(tiny_model("vit"), pixels)
    expected = np.zeros((4, 6))
    expected[1, 4] = 1.0
    np.testing.assert_allclose(maps, np.broadcast_to(expected, maps.shape), atol=1e-6)
    # CvT, 4×6 queries and 2×3 keys: every query reads key (0, 2), made from rows 0-1, columns 3-5.
    attention = np.zeros((batch, 2, 25, 7))
    attention[:, :, :, 1 + 0 * 3 + 2] = 1.0
    monkeypatch.setattr(explain, "_attentions", lambda graphdef, state, pixels, head_fusion: [attention] * 2)
    maps = explain.attention_rollout(tiny_model("cvt-cls"), pixels)
    window = np.zeros((4, 6), bool)
    window[:2, 3:] = True
    assert (maps[:, window] > 0.5).all() and not maps[:, ~window].any()


def test_vit_feature_grid_keeps_the_patch_positions(pixels):
    """With one layer, ViT's Grad-CAM grid is the embedded patches: changing the pixels of patch (2, 5) changes
    that cell only. (The head cannot catch a scrambled grid: the last layer is permutation-equivariant.)"""
    model = random_model(lambda: ViT(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=64, num_labels=3),
                                     rngs=nnx.Rngs(0)))
    changed = pixels.at[:, 16:24, 40:48].add(1.0)
    _, _, grid = _forward_and_split(*nnx.split(model), pixels)
    _, _, changed_grid = _forward_and_split(*nnx.split(model), changed)
    moved = np.abs(np.asarray(changed_grid) - np.asarray(grid)).max(axis=(0, 3)) > 1e-4
    expected = np.zeros((4, 6), bool)
    expected[2, 5] = True
    np.testing.assert_array_equal(moved, expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_head_of_features_is_the_forward(name, pixels):
    """Grad-CAM differentiates head(features(x)); it must be the model's forward, submodule for submodule."""
    model, cam_grid = tiny_model(name), MODELS[name][1]
    output, split_logits, grid = _forward_and_split(*nnx.split(model), pixels)
    assert grid.shape[1:3] == cam_grid
    logits, split_logits = np.asarray(output.logits), np.asarray(split_logits)
    assert logits.std() > 0.1, f"{name}: logits too small for the comparison to mean anything"
    np.testing.assert_allclose(split_logits, logits, rtol=0, atol=1e-6 * max(1, np.abs(logits).max()))


@pytest.mark.parametrize("name", ["vit", "cvt-cls", "cvt-avg", "resnet"])
def test_attention_rollout_maps(name, pixels):
    model, grid = tiny_model(name), MODELS[name][2]
    if grid is None:
        with pytest.raises(JaxmedError, match="grad_cam"):
            explain.attention_rollout(model, pixels)
        return
    # Another head fusion compiles another program: the tiny ViT's is cheap.
    settings = [{}, dict(discard_ratio=0.5, head_fusion="max")] if name == "vit" else [{}]
    attentions = _forward_and_split(*nnx.split(model), pixels)[0].attentions
    for kwargs in settings:
        maps = explain.attention_rollout(model, pixels, **kwargs)
        assert maps.shape == (BATCH, *grid) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0
        np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0, rtol=1e-6)
        assert (maps.std(axis=(1, 2)) > 1e-3).all(), f"{name}: flat maps from random O(1) weights"
        # The plumbing: the pure rollout of the model's own per-head attention, read as the docstring says.
        if name == "vit":
            expected = explain.rollout(attentions, **kwargs)[:, 0, 1:]
        else:
            config = model.config
            key_map = explain.cvt_key_map(config, 1, grid, with_cls=config.cls_token[-1])
            joint = explain.rollout(attentions[-config.depth[-1]:], key_map=key_map, **kwargs)
            expected = joint[:, 0, 1:] if config.cls_token[-1] else joint.mean(axis=1)
        np.testing.assert_allclose(maps, explain.normalise_maps(expected.reshape(BATCH, *grid)), atol=1e-5)


# cvt-avg and efficientnet-max differ from their siblings only in what test_head_of_features_is_the_forward checks.
@pytest.mark.parametrize("name", ["vit", "cvt-cls", "resnet", "efficientnet"])
def test_grad_cam_maps(name, pixels):
    model, cam_grid = tiny_model(name), MODELS[name][1]
    batch_stats = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    maps = explain.grad_cam(model, pixels)
    assert maps.shape == (BATCH, *cam_grid) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() == pytest.approx(1.0)
    for peak in maps.max(axis=(1, 2)):  # scaled to 1, or all zero when nothing speaks for the class
        assert peak == pytest.approx(1.0) or peak == 0
    predicted = np.asarray(_forward_and_split(*nnx.split(model), pixels)[0].logits).argmax(-1)
    np.testing.assert_allclose(explain.grad_cam(model, pixels, class_index=predicted), maps, atol=1e-6)
    other = explain.grad_cam(model, pixels, class_index=(predicted + 1) % 3)
    assert not np.allclose(other, maps, atol=1e-3), f"{name}: the class index changes nothing"
    # Eval semantics on a copy: the caller's (train-mode) model keeps its mode and its BatchNorm statistics.
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    jax.tree.map(np.testing.assert_array_equal, batch_stats, after)
    modes = [m.use_running_average for _, m in nnx.iter_modules(model) if hasattr(m, "use_running_average")]
    assert modes == [False] * len(modes)
    with pytest.raises(ValueError, match="out of range"):
        explain.grad_cam(model, pixels, class_index=3)


def test_grad_cam_finds_the_evidence():
    """A real jaxmed ResNet trained on images whose class is decided by a bright square in the top-left quadrant:
    Grad-CAM for that class puts most of its mass in the top-left quadrant of the 8×8 feature map (uniform: 25%)."""

    def batch(size, seed):
        rng = np.random.RandomState(seed)
        images = rng.randn(size, 64, 64, 3).astype(np.float32) * 0.5
        labels = rng.permutation(np.arange(size) % 2)
        for i in np.flatnonzero(labels):
            row, column = rng.randint(0, 32 - 8 + 1, 2)  # an 8×8 square anywhere inside the top-left 32×32
            images[i, row:row + 8, column:column + 8] += 2.0
        return jnp.asarray(images), jnp.asarray(labels)

    model = random_model(lambda: ResNet(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                     layer_type="basic", num_labels=2), rngs=nnx.Rngs(0)),
                         gain=2**0.5)  # He init
    model.eval()  # trained with its BatchNorms as fixed affine maps: deterministic and fast to converge
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(1e-2)

    @jax.jit
    def train_step(params, opt_state, images, labels):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params, rest)(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for step in range(30):
        params, opt_state = train_step(params, opt_state, *batch(32, step))
    model = nnx.merge(graphdef, params, rest)
    images, labels = batch(32, 1000)
    # The model learnt the task (logits from the program grad_cam below runs anyway).
    _, logits = explain._grad_cam(*nnx.split(model), images, jnp.ones(len(images), jnp.int32))
    assert (np.asarray(logits).argmax(-1) == np.asarray(labels)).mean() >= 0.95

    cams = explain.grad_cam(model, images, class_index=1)[np.asarray(labels) == 1]
    assert cams.shape[1:] == (8, 8)
    share = cams[:, :4, :4].sum(axis=(1, 2)) / cams.sum(axis=(1, 2))
    assert share.mean() > 0.6 and np.median(share) > 0.6, share


@pytest.mark.parametrize("name", ["vit", "cvt-cls", "resnet"])
def test_explanation_figures(name, pixels, tmp_path):
    model = tiny_model(name)
    images = np.random.RandomState(1).randint(0, 256, (BATCH, HEIGHT, WIDTH, 3)).astype(np.uint8)
    written = explain.explanation_figures(model, images, pixels, LABELS, CLASS_NAMES, tmp_path, per_class=2)
    both = ["attention_rollout.png", "gradcam_predicted_class.png"]
    expected = {"vit": both, "cvt-cls": both,
                "resnet": ["gradcam_predicted_class.png"]}[name]
    assert [path.name for path in written] == expected
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, path
