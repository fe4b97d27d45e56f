"""HF ⇄ Flax conversion: one declarative table per architecture (tables.py), the generic converter (core.py), and
Hugging Face model directories in and out (hub.py: from_pretrained, save_pretrained)."""

from jaxmed.convert.hub import from_pretrained, save_pretrained
from jaxmed.convert.tables import TABLES

__all__ = ["TABLES", "from_pretrained", "save_pretrained"]
