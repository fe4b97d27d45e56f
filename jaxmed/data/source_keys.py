"""Which `data` keys each `data.format` reads, so that a key the chosen source ignores is an error, not a silent
no-op (`--config.data.root=DIR` without `--config.data.format=imagefolder` would otherwise train on the phantoms).

Keys not in the table apply to every format.
"""

from __future__ import annotations

from jaxmed.errors import JaxmedError

FORMATS = ("imagefolder", "hf", "npz", "tfds", "synthetic")  # the built-in sources, in the order fixes suggest them
IGNORED_BY = {  # data key (a section stands for all its keys) → the formats whose source does not read it
    "root": ("synthetic",),  # the phantoms are generated, not read
    "class_names": ("imagefolder", "hf", "tfds", "synthetic"),  # they carry their own names; npz has none
    "dicom_frame": ("hf", "npz", "tfds", "synthetic"),  # only folders hold DICOM files
    "synthetic": ("imagefolder", "hf", "npz", "tfds"),
}


def readers(key: str) -> tuple[str, ...] | None:
    """The built-in formats that read `key` (dotted, under data); None: every format reads it."""
    ignored = IGNORED_BY.get(key, IGNORED_BY.get(key.split(".")[0]))
    return None if ignored is None else tuple(f for f in FORMATS if f not in ignored)


def _flat(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _normal(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def unread_keys(data, file_data=None) -> list[tuple[str, object, tuple]]:
    """[(key, value, formats that read it)] of `data` keys set away from their default that `data.format` ignores.

    `file_data`: the config file's own `data` section. A value the file set for its own format is not flagged when
    the command line switches the format (configs/demo.py's phantom sizes under `data.format=imagefolder`).
    """
    from jaxmed.data.config import default_config

    values, defaults = _flat(data), _flat(default_config())
    from_file = _flat(file_data) if file_data is not None else {}
    unread = []
    for key, value in values.items():
        ignored = IGNORED_BY.get(key) or IGNORED_BY.get(key.split(".")[0], ())
        if data.format not in ignored or _normal(value) == _normal(defaults.get(key)):
            continue
        if key in from_file and _normal(from_file[key]) == _normal(value) and file_data.format not in ignored:
            continue
        unread.append((key, value, readers(key)))
    return unread


def check_read_keys(data, file_data=None) -> None:
    """A JaxmedError naming the first key the chosen source would ignore, and the fix."""
    for key, value, formats in unread_keys(data, file_data):
        raise JaxmedError(f"data.{key}={value!r} is not read by data.format={data.format!r} (only by "
                          f"{', '.join(formats)}): add --config.data.format={formats[0]} to use it, or drop it")
