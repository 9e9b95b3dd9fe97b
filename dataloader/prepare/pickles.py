"""Safe loading of the pickles tieredImageNet and CIFAR-FS are released as: only NumPy arrays and builtin
containers are rebuilt, so a downloaded pickle cannot run code; Python 2 pickles load too."""
from __future__ import annotations

import pickle
from pathlib import Path

from dataloader.prepare.common import log, require_file
from utils import InputError

# Globals a data pickle may name: NumPy's array/scalar rebuilders and the byte codec they use.
_PICKLE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    ("__builtin__", "object"), ("builtins", "object"),
}


class _DataUnpickler(pickle.Unpickler):
    """Rebuilds arrays, numbers, strings and containers only; any other global is refused."""

    def find_class(self, module: str, name: str):
        # Python 2 / NumPy 1 pickles name ``numpy.core``; NumPy 2 moved it to ``numpy._core``.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not plain data)")
        return super().find_class(module, name)


def load_pickle(path: Path):
    """Load a (possibly Python 2) data pickle; InputError naming the file when it cannot be read."""
    require_file(path)
    log.info("loading %s", path)
    try:
        with open(path, "rb") as f:
            # latin1 turns Python 2 byte strings back into the bytes NumPy stored in them.
            return _DataUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise InputError(f"{path}: not a readable data pickle ({err}). Re-download it.") from err


def pickle_field(content, key: str, path: Path):
    """``content[key]`` of a loaded pickle dict; InputError naming the file and the keys it has."""
    if not isinstance(content, dict) or key not in content:
        keys = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise InputError(f"{path}: expected a dict with key '{key}', found {keys}")
    return content[key]
