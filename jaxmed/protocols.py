"""The reference notebooks' protocols (GUIDE §4), applied to a config so every configs/*.py states them once."""

from __future__ import annotations

REFERENCE_AUGMENTATION = dict(enabled=True, rotation=15.0, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), hflip=True,
                              vflip=True, brightness=0.2, contrast=0.2, translate=0.0)


def finetune(config, init_from: str, *, lr: float = 2e-5, epochs: float = 10, batch_size: int = 16):
    """Sartaj/BRISC fine-tuning as the HF Trainer notebooks ran it: stratified 80/20 split of train with seed 42,
    AdamW lr 2e-5, weight decay 0.01, batch 16, 10 epochs, linear decay, evaluate every epoch, best by val
    accuracy; rotation ±15°, RandomResizedCrop(.8–1), both flips, brightness/contrast .2."""
    config.model.init_from = init_from
    config.data.val_fraction = 0.2
    config.data.split_seed = 42
    config.data.grayscale = True
    config.data.augment.update(REFERENCE_AUGMENTATION)
    config.optim.name = "adamw"
    config.optim.lr = lr
    config.optim.weight_decay = 0.01
    config.optim.schedule = "linear"
    config.train.epochs = epochs
    config.train.batch_size = batch_size
    config.train.eval_every_steps = 0
    config.train.best_metric = "accuracy"
    config.train.best_mode = "max"
    return config


def sartaj(config):
    """Sartaj's Brain-Tumor-Classification (HF dataset, Training/Testing splits)."""
    config.data.format = "hf"
    config.data.root = "sartajbhuvaji/Brain-Tumor-Classification"
    config.data.source = ("get sartajbhuvaji/Brain-Tumor-Classification from the Hugging Face hub (or its Kaggle "
                          "zips unpacked as Training/ and Testing/ class folders)")
    return config


def brisc(config):
    """BRISC 2025 (Kaggle briscdataset/brisc2025): classification_task/{train,test}/<class>/*.jpg."""
    config.data.format = "imagefolder"
    config.data.root = "data/brisc2025"
    config.data.source = "download BRISC 2025 from Kaggle (briscdataset/brisc2025)"
    return config


# Kermany file names carry the patient: person<N>_bacteria_<M>.jpeg and person<N>_virus_<M>.jpeg (the same N can
# have both), IM-<N>-<M>.jpeg and NORMAL2-IM-<N>-<M>.jpeg. The leftmost match wins, so NORMAL2-IM-<N> is its own id.
KERMANY_PATIENT = r"(?:^|/)(person\d+|NORMAL2-IM-\d+|IM-\d+)[_-][^/]*$"


def kermany(config, init_from: str):
    """Kermany chest X-ray: train+val merged and re-split 80/20 stratified by patient, class-balanced sampling; phase 1 the
    head only (AdamW 1e-3, 5 epochs), phase 2 everything (1e-4, 8 epochs); kept by pneumonia recall."""
    config.data.format = "imagefolder"
    config.data.root = "data/chest_xray"
    config.data.source = "download Kermany's chest X-ray images (Kaggle paultimothymooney/chest-xray-pneumonia)"
    config.data.merge_train_val = True
    config.data.group_pattern = KERMANY_PATIENT  # re-split by patient: no patient on both sides of train/val
    config.data.val_fraction = 0.2
    config.data.split_seed = 42
    config.data.balanced_sampling = True
    config.data.grayscale = True
    config.model.init_from = init_from
    config.optim.name = "adamw"
    config.optim.weight_decay = 0.01
    config.optim.schedule = "linear"
    config.train.batch_size = 32
    config.train.phases = [dict(name="head", epochs=5, lr=1e-3, trainable=("classifier",)),
                           dict(name="all", epochs=8, lr=1e-4, trainable=())]
    config.train.best_metric = "recall/PNEUMONIA"
    config.train.best_mode = "max"
    config.eval.positive_class = "PNEUMONIA"  # the threshold that misses almost no pneumonia (recall ≥ 0.99)
    return config


def linear_probe(config, epochs: float = 20):
    """Frozen backbone, trained linear head (20 epochs); judged by accuracy, balanced accuracy and Cohen's κ."""
    config.optim.trainable = ("classifier",)
    config.optim.lr = 1e-3
    config.optim.weight_decay = 0.0
    config.train.epochs = epochs
    config.train.best_metric = "balanced_accuracy"
    return config


def greedy_layerwise(config, layers: int, *, epochs: float = 10, lr: float = 1e-3, classifier_epochs: float = 20,
                     classifier_lr: float = 1e-3):
    """The stacked autoencoder's training: encoder k pretrained alone to reconstruct its input (encoders.k and
    decoders.k train, everything else frozen), one phase per layer, then a linear classifier on frozen encoders."""
    config.train.phases = [
        *(dict(name=f"autoencoder{k}", epochs=epochs, lr=lr, objective="reconstruction", layer=k,
               trainable=(rf"^encoders\.{k}\.", rf"^decoders\.{k}\.")) for k in range(layers)),
        dict(name="classifier", epochs=classifier_epochs, lr=classifier_lr, trainable=(r"^classifier\.",)),
    ]
    return config


# The class folders of the datasets the protocols above read, in the order their loaders sort them, so a run's
# shapes (e.g. for `python -m jaxmed.aot`) are known on a machine without the data.
KNOWN_CLASSES = {
    "data/brisc2025": ("glioma", "meningioma", "no_tumor", "pituitary"),
    "sartajbhuvaji/Brain-Tumor-Classification": ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"),
    "data/chest_xray": ("NORMAL", "PNEUMONIA"),
    "data/pneumoniamnist_64.npz": ("normal", "pneumonia"),  # MedMNIST PneumoniaMNIST
}
