"""The `data` section of an experiment config, with the defaults every configs/*.py starts from."""

from __future__ import annotations

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.format = "synthetic"  # imagefolder | hf | npz | tfds | synthetic
    config.root = ""  # folder, HF dataset dir/parquet/hub id, .npz file, or TFDS dataset dir
    config.source = ""  # where to get the data, for error messages (configs/*.py fill it in)
    config.cache_dir = "~/.cache/jaxmed/data"
    config.cache_size = 256  # side of the square train-split cache that augmentation crops from
    config.grayscale = True  # MRI and X-ray: drop colour so a model cannot learn the file's colour mode
    config.strict = False  # True: unreadable files are an error instead of being skipped
    config.class_names = ()  # names for sources that carry none (npz); empty: class_0, class_1, ...
    config.val_fraction = 0.2  # carved from train (stratified) when the source has no val split
    config.calibration_fraction = 0.0  # > 0: carve a "calibration" split from train (after val, stratified, by
    #                                    patient with group_pattern) for conformal prediction sets; 0: they reuse val
    config.split_seed = 42
    config.group_pattern = ""  # regex; its first group is the patient id in each image's path relative to its split
    #                            folder: no patient on both sides of a carved split, shared patients reported
    config.cv_folds = 0  # set by train.folds for each fold's run: hold out fold cv_fold of train+val as test
    config.cv_fold = -1
    config.merge_train_val = False  # Kermany protocol: merge the given train+val, then re-split
    config.drop_duplicates = False  # drop train images that duplicate a val/test image
    config.near_duplicate_threshold = 4  # max Hamming distance of 64-bit pHashes (then confirmed); <0 disables
    config.balanced_sampling = False
    config.shards = 0  # data shards, each read by one host; 0 = the process count. A multiple of the process
    #                    count lets one host reproduce exactly the batches of a larger multi-host job
    config.num_workers = 0  # grain worker processes; 0 = in-process (threads)
    config.decode_threads = 0  # threads decoding files into the cache; 0 = one per core
    config.dicom_frame = -1  # multi-frame DICOM: which frame; -1 = the middle one
    config.mask_root = ""  # lesion masks (PNG) at the images' paths relative to data.root: explanation localisation
    # NIfTI volumes (.nii, .nii.gz) become 2-D slices (data/nifti.py), each slice id `path#axis=index`:
    config.volume_axis = "axial"  # axial | sagittal | coronal, in the canonical (RAS+) orientation
    config.volume_slices = ml_collections.FieldReference("middle", field_type=object)  # "middle" | "all" | an
    #                      integer k: k evenly spaced slices within the volume's non-empty extent
    config.volume_frame = 0  # 4-D volumes: which frame (time point / volume index)

    config.synthetic = ml_collections.ConfigDict()
    config.synthetic.size = 96
    config.synthetic.train_per_class = 250
    config.synthetic.test_per_class = 50
    config.synthetic.seed = 0

    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = True
    config.augment.rotation = 15.0  # degrees, uniform in ±rotation
    config.augment.scale = (0.8, 1.0)  # RandomResizedCrop area fraction
    config.augment.ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio (log-uniform)
    config.augment.hflip = True
    config.augment.vflip = True
    config.augment.brightness = 0.2  # factor uniform in 1 ± brightness
    config.augment.contrast = 0.2  # factor uniform in 1 ± contrast
    config.augment.translate = 0.0  # max shift as a fraction of width/height (RandomAffine-style)
    return config
