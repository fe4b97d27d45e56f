"""Which `data` keys each `data.format` reads, so that a key the chosen source ignores is an error, not a silent
no-op (`--config.data.root=DIR` without `--config.data.format=imagefolder` would otherwise train on the phantoms).

Keys not in the table apply to every format.
"""

from __future__ import annotations

from jaxmed.errors import JaxmedError

READ_BY = {  # data key (a section stands for all its keys) → the formats whose source reads it
    "root": ("imagefolder", "hf", "npz", "tfds"),
    "class_names": ("npz",),  # the other sources carry their own class names
    "dicom_frame": ("imagefolder",),  # the only source of DICOM files
    "synthetic": ("synthetic",),
}


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
        readers = READ_BY.get(key, READ_BY.get(key.split(".")[0]))
        if readers is None or data.format in readers or _normal(value) == _normal(defaults.get(key)):
            continue
        if key in from_file and _normal(from_file[key]) == _normal(value) and file_data.format in readers:
            continue
        unread.append((key, value, readers))
    return unread


def check_read_keys(data, file_data=None) -> None:
    """A JaxmedError naming the first key the chosen source would ignore, and the fix."""
    for key, value, readers in unread_keys(data, file_data):
        raise JaxmedError(f"data.{key}={value!r} is not read by data.format={data.format!r} (only by "
                          f"{', '.join(readers)}): add --config.data.format={readers[0]} to use it, or drop it")
