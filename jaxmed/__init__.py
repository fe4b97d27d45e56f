"""jaxmed: fine-tune and evaluate medical-image classifiers in JAX/Flax from Hugging Face weights."""

__version__ = "0.1.0"
