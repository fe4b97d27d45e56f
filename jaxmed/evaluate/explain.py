"""Why did the classifier say that: attention rollout (ViT, CvT) and Grad-CAM (ResNet, EfficientNet, CvT, ViT) as
heatmaps on the model's patch or feature grid, and the figures that overlay them on the images.

Every explanation runs the model in eval mode (BatchNorm running statistics, no dropout or drop path) on a copy
that shares the weights, so the caller's model keeps its mode.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmed.errors import JaxmedError
from jaxmed.evaluate.figures import overlay
from jaxmed.models import CvT, EfficientNet, ResNet, ViT

HEAD_FUSIONS = ("mean", "max", "min")


# ------------------------------------------------------------------------------------------------ attention rollout


def rollout(attentions: Sequence, *, discard_ratio: float = 0.0, head_fusion: str = "mean",
            key_map: np.ndarray | None = None) -> np.ndarray:
    """Abnar & Zuidema's attention rollout: the joint attention (B, T, T) of token i on input token j.

    `attentions` holds one (B, heads, T, K) array per layer, first layer first. Per layer the heads are fused
    (`head_fusion`: mean, max or min over heads), the lowest `discard_ratio` fraction of each sample's fused
    weights is set to 0 (a denoising trick from jacobgil/vit-explain; the identity added next keeps every row
    non-empty), the residual connection is accounted for by adding the identity, rows are renormalised to sum to
    1, and the layers are multiplied: joint = R_L · … · R_1.

    Keys may differ from queries (K != T, CvT's strided key/value projections); then `key_map` (K, T) says which
    query-position tokens each key/value token is computed from (rows summing to 1), and R = A · key_map.
    """
    if not len(attentions):
        raise ValueError("rollout needs the attention weights of at least one layer")
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion={head_fusion!r}: expected one of {HEAD_FUSIONS}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio={discard_ratio}: expected a fraction in [0, 1)")
    joint = None
    for index, weights in enumerate(attentions):
        weights = np.asarray(weights, np.float64)
        if weights.ndim != 4:
            raise ValueError(f"attention of layer {index} has shape {weights.shape}; expected (B, heads, T, K)")
        fused = getattr(weights, head_fusion)(axis=1)
        if discard_ratio > 0.0:
            fused = _discard_lowest(fused, discard_ratio)
        if key_map is not None:
            fused = fused @ np.asarray(key_map, np.float64)
        tokens = fused.shape[-2]
        if fused.shape[-1] != tokens:
            raise ValueError(f"attention of layer {index} maps {tokens} queries to {fused.shape[-1]} keys; rollout "
                             "needs square attention or a key_map (keys, queries) to map keys to query positions")
        mixed = fused + np.eye(tokens)
        mixed /= mixed.sum(-1, keepdims=True)
        joint = mixed if joint is None else mixed @ joint
    return joint.astype(np.float32)


def _discard_lowest(fused: np.ndarray, ratio: float) -> np.ndarray:
    flat = fused.reshape(fused.shape[0], -1).copy()
    count = int(flat.shape[1] * ratio)
    if count:
        lowest = np.argpartition(flat, count - 1, axis=1)[:, :count]
        np.put_along_axis(flat, lowest, 0.0, axis=1)
    return flat.reshape(fused.shape)


def attention_rollout(model, pixels, *, discard_ratio: float = 0.0, head_fusion: str = "mean") -> np.ndarray:
    """Attention rollout maps (B, grid_h, grid_w), each scaled to max 1, for NHWC (normalised) `pixels`.

    ViT: rollout over all layers; the map is the CLS token's row over the patch tokens, on the patch grid.

    CvT: rollout is defined only where every layer maps the same token set onto itself, which in CvT holds within a
    stage (stages are joined by strided convolutional embeddings) — and even there keys and values are strided
    depthwise-conv (or average-pool) projections of the token grid, so attention is (1 + h·w) × (1 + h'·w'). The
    map here is the rollout over the **last stage's layers only** (the earlier stages are not included), on the
    last stage's grid, with each key/value token mapped back to the query-grid tokens its projection window reads,
    uniformly over the in-bounds window positions (the cls key maps to the cls token): R = A · key_map. This treats
    the learned depthwise kernel as a plain average over its window, which is the approximation. The map is the
    cls row when the last stage has a cls token (CvT-13: the logits come from it), otherwise the mean of all rows
    (the head mean-pools every token).

    Models without attention (ResNet, EfficientNet) raise JaxmedError: use `grad_cam`.
    """
    pixels = _as_batch(pixels)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion={head_fusion!r}: expected one of {HEAD_FUSIONS}")
    if not isinstance(model, (ViT, CvT)):
        raise JaxmedError(f"attention_rollout needs a model with attention (ViT or CvT); a {type(model).__name__} "
                          "has none — use grad_cam(model, pixels) instead")
    attentions = _attentions(*nnx.split(model), pixels, head_fusion)
    if isinstance(model, ViT):
        patch = model.config.patch_size
        grid = (pixels.shape[1] // patch, pixels.shape[2] // patch)
        joint = rollout(attentions, discard_ratio=discard_ratio)
        maps = joint[:, 0, 1:]
    else:
        config = model.config
        grid = cvt_grids(config, pixels.shape[1:3])[-1]
        with_cls = bool(config.cls_token[-1])
        key_map = cvt_key_map(config, len(config.depth) - 1, grid, with_cls)
        if attentions[0].shape[-2:] != (key_map.shape[1], key_map.shape[0]):
            raise AssertionError(f"CvT last-stage attention is {attentions[0].shape[-2:]} but its grid {grid} "
                                 f"predicts {(key_map.shape[1], key_map.shape[0])}: cvt_grids disagrees with the model")
        joint = rollout(attentions, discard_ratio=discard_ratio, key_map=key_map)
        maps = joint[:, 0, 1:] if with_cls else joint.mean(axis=1)
    return normalise_maps(maps.reshape(len(maps), *grid))


def normalise_maps(maps) -> np.ndarray:
    """Each map divided by its maximum (so in [0, 1], max 1); a map with no positive value becomes all zeros."""
    maps = np.maximum(np.asarray(maps, np.float32), 0.0)
    peak = maps.reshape(len(maps), -1).max(axis=1).reshape((-1,) + (1,) * (maps.ndim - 1))
    return np.where(peak > 0, maps / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def cvt_grids(config, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Each CvT stage's token grid (h, w) for an image of `image_hw`: its conv embedding's output size."""
    height, width = image_hw
    grids = []
    for kernel, stride, padding in zip(config.patch_sizes, config.patch_stride, config.patch_padding):
        height = (height + 2 * padding - kernel) // stride + 1
        width = (width + 2 * padding - kernel) // stride + 1
        grids.append((height, width))
    return grids


def cvt_key_map(config, stage: int, grid: tuple[int, int], with_cls: bool) -> np.ndarray:
    """(keys, queries): key/value token k of `stage` spread uniformly over the grid tokens its window reads."""
    ceil_mode = config.qkv_projection_method[stage] == "avg"  # the original CvT's AvgPool2d(ceil_mode=True)
    args = (config.kernel_qkv[stage], config.stride_kv[stage], config.padding_kv[stage], ceil_mode)
    rows, columns = _windows(grid[0], *args), _windows(grid[1], *args)
    # Row-major flattening on both sides: key (a, b) is a·w' + b, query (i, j) is i·w + j.
    grid_map = np.kron(rows, columns)
    grid_map /= grid_map.sum(1, keepdims=True)
    if not with_cls:
        return grid_map
    key_map = np.zeros((grid_map.shape[0] + 1, grid_map.shape[1] + 1))
    key_map[0, 0] = 1.0
    key_map[1:, 1:] = grid_map
    return key_map


def _windows(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> np.ndarray:
    """(outputs, size) 0/1 matrix: which input positions each output of a padded, strided window reads."""
    if ceil_mode:  # torch: one more, partial window, provided it starts inside the padded input
        outputs = -(-(size + 2 * padding - kernel) // stride) + 1
        if (outputs - 1) * stride >= size + padding:
            outputs -= 1
    else:
        outputs = (size + 2 * padding - kernel) // stride + 1
    windows = np.zeros((outputs, size))
    for output in range(outputs):
        start = output * stride - padding
        windows[output, max(start, 0):min(start + kernel, size)] = 1.0
    if not windows.any(axis=1).all():
        raise ValueError(f"a key window (kernel {kernel}, stride {stride}, padding {padding}) lies entirely in the "
                         f"padding of a {size}-token axis")
    return windows


@functools.partial(jax.jit, static_argnums=(0, 3))
def _attentions(graphdef, state, pixels, head_fusion: str):
    """Per layer (B, 1, T, K), heads fused in the program: ViT-B's 12 heads × 12 layers of 197² weights would be
    ~20 MB per image on the host. CvT: the last stage's layers only (its first stage alone is 3136 × 784)."""
    model = _eval_merge(graphdef, state)
    attentions = model.forward(pixels, output_attentions=True).attentions
    if isinstance(model, CvT):
        attentions = attentions[-model.config.depth[-1]:]
    fuse = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion]
    return [fuse(weights.astype(jnp.float32), axis=1, keepdims=True) for weights in attentions]


# --------------------------------------------------------------------------------------------------------- Grad-CAM


class Features(NamedTuple):
    """The forward split where Grad-CAM looks: `grid` (B, h, w, C) is the map it weighs; `context` is whatever
    else the head needs, held fixed (the cls token of ViT and CvT-13); None for CNNs."""

    grid: jax.Array
    context: Any = None


# The forward of each architecture as features(model, pixels) → Features and head(model, features) → logits. Both
# call the model's submodules in its forward's order, so head(model, features(model, x)) == model(x).


def resnet_features(model: ResNet, pixels) -> Features:
    """The last encoder stage's output."""
    x = model.resnet.embedder(pixels)
    for stage in model.resnet.encoder.stages:
        x = stage(x)
    return Features(x)


def resnet_head(model: ResNet, features: Features):
    return model.classifier(jnp.mean(features.grid, axis=(1, 2)))


def efficientnet_features(model: EfficientNet, pixels) -> Features:
    """After the 1×1 top conv, its BatchNorm and activation: the map the head pools."""
    encoder = model.efficientnet.encoder
    x = model.efficientnet.embeddings(pixels)
    for block in encoder.blocks:
        x = block(x)
    return Features(encoder.top_activation(encoder.top_bn(encoder.top_conv(x))))


def efficientnet_head(model: EfficientNet, features: Features):
    x = features.grid
    pooled = jnp.max(x, axis=(1, 2)) if model.config.pooling_type == "max" else jnp.mean(x, axis=(1, 2))
    pooled = model.dropout(pooled)
    return model.classifier(pooled) if model.classifier is not None else pooled


def cvt_features(model: CvT, pixels) -> Features:
    """The last stage's token grid that reaches the logits.

    With a cls token in the last stage (CvT-13) the head reads only the cls token, so the stage's output grid has
    zero gradient; the grid used is the tokens entering the last stage's last layer, whose attention (keys and
    values projected from this grid) is the last place spatial information flows into the cls token — the CvT
    analogue of the usual ViT Grad-CAM layer. Without a cls token the head mean-pools the stage's output grid,
    which is then used, as for a CNN.
    """
    *earlier, last = model.cvt.encoder.stages
    x = pixels
    for stage in earlier:
        x, _, _ = stage(x)
    grid = last.embedding(x)
    batch, height, width, dim = grid.shape
    tokens = grid.reshape(batch, height * width, dim)
    if last.cls_token is None:
        for layer in last.layers:
            tokens, _ = layer(tokens, height, width)
        return Features(tokens.reshape(batch, height, width, dim))
    cls = jnp.broadcast_to(last.cls_token[...].astype(tokens.dtype), (batch, 1, dim))
    tokens = jnp.concatenate([cls, tokens], axis=1)
    for layer in last.layers[:-1]:
        tokens, _ = layer(tokens, height, width)
    return Features(tokens[:, 1:].reshape(batch, height, width, dim), context=tokens[:, :1])


def cvt_head(model: CvT, features: Features):
    last = model.cvt.encoder.stages[-1]
    batch, height, width, dim = features.grid.shape
    tokens = features.grid.reshape(batch, height * width, dim)
    if features.context is not None:
        tokens, _ = last.layers[-1](jnp.concatenate([features.context, tokens], axis=1), height, width)
        tokens = tokens[:, :1]
    pooled = jnp.mean(model.layernorm(tokens), axis=1)
    return model.classifier(pooled) if model.classifier is not None else pooled


def vit_features(model: ViT, pixels) -> Features:
    """The patch tokens entering the last layer (the CLS token is the context): the last place spatial
    information flows into the CLS token, which alone feeds the classifier."""
    x = model.vit.embeddings(pixels, None)
    for layer in model.vit.encoder.layer[:-1]:
        x, _ = layer(x)
    patch = model.config.patch_size
    grid = (pixels.shape[1] // patch, pixels.shape[2] // patch)
    return Features(x[:, 1:].reshape(x.shape[0], *grid, x.shape[-1]), context=x[:, :1])


def vit_head(model: ViT, features: Features):
    batch, height, width, dim = features.grid.shape
    x = jnp.concatenate([features.context, features.grid.reshape(batch, height * width, dim)], axis=1)
    x, _ = model.vit.encoder.layer[-1](x)
    return model.classifier(model.vit.layernorm(x)[:, 0])


# Architecture → (features, head). An explicit table, like jaxmed.models.MODELS.
FEATURE_SPLITS: dict[type, tuple[Callable, Callable]] = {
    ResNet: (resnet_features, resnet_head),
    EfficientNet: (efficientnet_features, efficientnet_head),
    CvT: (cvt_features, cvt_head),
    ViT: (vit_features, vit_head),
}


# model types (jaxmed.models.MODELS keys) whose figures `explanation_figures` draws
EXPLAINED = ("vit", "cvt", "resnet", "efficientnet")


def feature_split(model) -> tuple[Callable, Callable]:
    for architecture, split in FEATURE_SPLITS.items():
        if isinstance(model, architecture):
            return split
    raise JaxmedError(f"grad_cam supports {', '.join(cls.__name__ for cls in FEATURE_SPLITS)}; got a "
                      f"{type(model).__name__}")


def grad_cam(model, pixels, class_index=None) -> np.ndarray:
    """Grad-CAM maps (B, h, w) in [0, 1] (each scaled to max 1; all zeros when no channel speaks for the class).

    The class score is the logit of `class_index` (an int, or one per image; default: each image's predicted
    class). Its gradient with respect to the feature map A (see FEATURE_SPLITS: ResNet's last stage output,
    EfficientNet's map after top_activation, CvT's and ViT's token grid entering the last layer) is averaged
    over space into channel weights w, and the map is ReLU(Σ_c w_c A_c), on A's grid.
    """
    pixels = _as_batch(pixels)
    feature_split(model)  # an unsupported architecture fails here, with a message, not inside jit
    if isinstance(model, (EfficientNet, CvT)) and model.classifier is None:
        raise JaxmedError(f"this {type(model).__name__} has no classification head (num_labels=0): there is no class "
                          "score to explain")
    if class_index is None:
        classes = np.full(len(pixels), -1, np.int32)
    else:
        classes = np.broadcast_to(np.asarray(class_index, np.int32), (len(pixels),))
        num_labels = model.config.num_labels
        if classes.min() < 0 or classes.max() >= num_labels:
            raise ValueError(f"class_index {class_index} is out of range for a model with {num_labels} classes")
    cams, _ = _grad_cam(*nnx.split(model), pixels, jnp.asarray(classes))
    return normalise_maps(cams)


@functools.partial(jax.jit, static_argnums=0)
def _grad_cam(graphdef, state, pixels, classes):
    """(unnormalised maps, logits); `classes` -1 means the predicted class."""
    model = _eval_merge(graphdef, state)
    features_fn, head_fn = feature_split(model)
    features = features_fn(model, pixels)

    def class_score(grid):
        logits = head_fn(model, features._replace(grid=grid))
        chosen = jnp.where(classes < 0, jnp.argmax(jax.lax.stop_gradient(logits), axis=-1), classes)
        # Images are independent in eval mode, so the gradient of the sum is each image's own gradient.
        return jnp.sum(jnp.take_along_axis(logits, chosen[:, None], axis=1).astype(jnp.float32)), logits

    grads, logits = jax.grad(class_score, has_aux=True)(features.grid)
    weights = jnp.mean(grads.astype(jnp.float32), axis=(1, 2))
    return jax.nn.relu(jnp.einsum("bhwc,bc->bhw", features.grid.astype(jnp.float32), weights)), logits


# ---------------------------------------------------------------------------------------------------------- figures


def explanation_figures(model, images_uint8, pixels, labels, class_names: Sequence[str], out_dir,
                        per_class: int = 2) -> list[Path]:
    """Heatmaps over the first `per_class` images of each class, titled "true / pred", as PNGs in `out_dir`.

    `images_uint8` (N, H, W[, C]) are the images to show, `pixels` (N, h, w, C) the same images as the model
    takes them. Writes attention_rollout.png (ViT, CvT) and gradcam_predicted_class.png (every architecture
    Grad-CAM supports; it explains the predicted class). Returns the paths written.
    """
    labels = np.asarray(labels)
    if not len(images_uint8) == len(pixels) == len(labels):
        raise ValueError(f"explanation_figures needs one image, one pixel array and one label per example; got "
                         f"{len(images_uint8)}, {len(pixels)}, {len(labels)}")
    chosen = [int(i) for c in range(len(class_names)) for i in np.flatnonzero(labels == c)[:per_class]]
    if not chosen:
        raise ValueError(f"no example has a label in 0..{len(class_names) - 1}; labels: {np.unique(labels)}")
    images, pixels, labels = np.asarray(images_uint8)[chosen], _as_batch(np.asarray(pixels)[chosen]), labels[chosen]
    feature_split(model)  # every architecture with attention also has Grad-CAM; the others fail here
    # Grad-CAM of the predicted class computes the logits anyway: one program gives both.
    cams, logits = _grad_cam(*nnx.split(model), pixels, jnp.full(len(pixels), -1, jnp.int32))
    predictions = np.asarray(logits).argmax(-1)
    titles = [f"true: {class_names[t]}\npred: {class_names[p]}" for t, p in zip(labels, predictions)]
    out_dir = Path(out_dir)
    written = []
    if isinstance(model, (ViT, CvT)):
        written.append(out_dir / "attention_rollout.png")
        overlay(images, attention_rollout(model, pixels), titles, written[-1])
    written.append(out_dir / "gradcam_predicted_class.png")
    overlay(images, normalise_maps(cams), titles, written[-1])
    return written


# ---------------------------------------------------------------------------------------------------------- helpers


def _eval_merge(graphdef, state):
    """A model in eval mode built from a split: new module objects, so the caller's model keeps its mode."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def _as_batch(pixels) -> jax.Array:
    pixels = jnp.asarray(pixels)
    if pixels.ndim != 4:
        raise ValueError(f"pixels must be a batch (B, H, W, C), NHWC and normalised as the model expects; got shape "
                         f"{pixels.shape}")
    return pixels
