"""The experiment config every configs/*.py starts from: every key a run reads, with its default.

Durations are in epochs (`train.epochs`, a phase's `epochs`, fractional allowed) or, when `train.steps` > 0,
in steps; `train.eval_every_steps` = 0 evaluates once per epoch. A step is one optimizer update (of
`train.grad_accumulation` batches), as the HF Trainer's max_steps; an epoch is ceil(images / batch) batches.
"""

from __future__ import annotations

import ml_collections

from jaxmed import data


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = data.default_config()

    config.model = ml_collections.ConfigDict()
    config.model.name = "vit"  # a key of jaxmed.models.MODELS: vit, resnet, cvt, efficientnet, jaxmed_sae
    config.model.init_from = ""  # HF hub id or local HF directory; empty: random init from model.hf_config
    config.model.hf_config = ml_collections.ConfigDict()  # transformers config kwargs for a from-scratch model
    config.model.preprocessor = ml_collections.ConfigDict()  # overrides of the preprocessor_config.json keys
    config.model.dtype = "float32"  # compute dtype; "bfloat16" for mixed precision (weights stay float32)
    config.model.remat = "none"  # none | blocks | full: recompute each block's activations in the backward pass
    #                              (blocks keeps the linear layers' outputs); less memory, more compute (aot.py)

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 10.0
    config.train.steps = 0  # > 0: train this many steps instead of the epochs, shared over the phases by their epochs
    config.train.min_steps = 0  # > 0: stretch the epochs to at least this many steps (small datasets)
    config.train.batch_size = 16  # global, over all hosts and devices
    config.train.drop_last = False  # True: drop each epoch's last, partial batch (HF dataloader_drop_last); False:
    #                                 train on it, padded and masked out of the loss
    config.train.eval_batch_size = 64
    config.train.phases = ()  # list of {name, epochs, lr, trainable, objective, layer}; empty: one phase
    #                           (train.epochs, optim.lr). objective "reconstruction" + layer: greedy pretraining
    config.train.eval_every_steps = 0  # 0: every epoch
    config.train.log_every_steps = 10
    config.train.best_metric = "accuracy"  # a validation metric; the best checkpoints are kept by it
    config.train.best_mode = ""  # max | min; empty: min for a metric ending in "loss", else max (HF greater_is_better)
    config.train.keep_best = 1
    config.train.early_stopping_patience = 0  # validations without a strictly better best_metric before the phase
    #                                           stops (each phase its own patience, as a new HF Trainer); 0: never
    config.train.label_smoothing = 0.0
    config.train.class_weighted_loss = False  # weights inverse to class frequency (sklearn 'balanced')
    config.train.grad_accumulation = 1
    config.train.folds = 0  # K > 1: K-fold cross-validation of train+val into W/fold_<k>/ and W/cv/ (crossval.py)
    config.train.evaluate_test = True  # at the end, evaluate the best checkpoint on the test split
    config.train.async_checkpoints = True
    config.train.trackers = ("tensorboard",)  # any of tensorboard, wandb, mlflow: each gets what metrics.jsonl gets
    config.train.tracker_start_timeout = 60.0  # seconds a tracker may take to start; then training goes on without it
    config.train.wandb = ml_collections.ConfigDict()  # WANDB_MODE=offline keeps the run in W/wandb for `wandb sync`
    config.train.wandb.project = "jaxmed"
    config.train.wandb.entity = ""  # empty: your default entity
    config.train.wandb.name = ""  # run name; empty: the workdir's name
    config.train.wandb.tags = ()
    config.train.mlflow = ml_collections.ConfigDict()
    config.train.mlflow.tracking_uri = ""  # empty: MLFLOW_TRACKING_URI, else a file store in W/mlruns
    config.train.mlflow.experiment = "jaxmed"
    config.train.resume = "check"  # rerunning a workdir whose saved config differs in a results-changing key is an
    #                                error; "ignore_changes": resume anyway, recorded in W/config_history.json

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"  # adamw | sgd
    config.optim.lr = 2e-5
    config.optim.weight_decay = 0.01
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.momentum = 0.9  # sgd
    config.optim.nesterov = False  # sgd
    config.optim.schedule = "linear"  # linear (HF Trainer's default) | cosine | constant
    config.optim.warmup_steps = 0
    config.optim.warmup_ratio = 0.0
    config.optim.clip_norm = 1.0  # HF Trainer's max_grad_norm; 0 disables
    config.optim.trainable = ()  # regexes of trainable parameter paths for a single-phase run; empty: all

    config.eval = ml_collections.ConfigDict()  # python -m jaxmed.evaluate, and the end of training
    config.eval.calibrate = True  # fit a temperature on val (min NLL); reports, operating point and predict use it
    config.eval.positive_class = ""  # a class name: choose on val the threshold reaching target_recall for it
    config.eval.target_recall = 0.99
    config.eval.bootstrap = 1000  # resamples for the κ / F1 / AUC 95% intervals; 0 disables (proportions keep theirs)
    config.eval.proportion_interval = "wilson"  # accuracy, recall, precision, sensitivity…: wilson | clopper-pearson
    config.eval.seed = 0
    config.eval.ood_method = ""  # energy | mahalanobis | rmds | vim | knn; empty: the architecture's default
    #                              (jaxmed/evaluate/ood.py DEFAULT_METHOD); every detector is reported either way
    config.eval.ood_keep = 0.95  # fraction of val images kept as in distribution: sets the OOD threshold
    config.eval.conformal_method = "aps"  # prediction sets: lac | aps (randomised, seeded by eval.seed) | raps
    config.eval.conformal_mondrian = True  # a threshold per class (class-conditional coverage); False: one for all
    config.eval.conformal_alpha = 0.05  # sets hold the true class with probability >= 1 - alpha; calibrated on the
    #                                     calibration split (data.calibration_fraction), else on val (approximate)
    config.eval.grid_images = 16  # predictions_grid.png
    config.eval.explain_per_class = 2  # images per class in attention_rollout.png, gradcam_predicted_class.png;
    #                                    0 disables
    config.eval.explain_check_images = 48  # images the explanations are checked on (deletion/insertion, model
    #                                        randomisation, localisation with masks); 0 disables

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices not used by fsdp
    config.mesh.fsdp = 1
    return config


def load_run_config(workdir) -> ml_collections.ConfigDict:
    """A run's resolved config (W/config.json) over today's defaults, so older runs gain new keys."""
    import json

    from jaxmed.errors import JaxmedError

    path = workdir / "config.json"
    if not path.exists():
        raise JaxmedError(f"no config.json in {workdir}: is this a jaxmed run directory (--workdir of jaxmed.main)?")
    config = base_config()
    _merge(config, json.loads(path.read_text()))
    return config


def _merge(node, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and key in node and hasattr(node[key], "keys") and key != "hf_config":
            _merge(node[key], value)
        else:
            node[key] = value
