"""Test session setup: 8 simulated CPU devices and no hub access, before jax or transformers are imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU only, also in subprocesses: with libtpu installed (the aot-tpu extra, for jaxmed.aot's deviceless compiles)
# jax would otherwise try to start a TPU backend in every process and print libtpu's warnings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
