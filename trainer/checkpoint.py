"""The one checkpoint saver and loader.

Format (the original's, so released checkpoints keep working): ``{'params': state_dict, ...metadata}``.
Our saves add ``kind`` (``"backbone"`` or ``"meta"``), ``config``, ``epoch`` and anything else the caller
passes. Loading is safe (``weights_only=True``: a file that carries pickled code is refused) and strict: keys
are compared with the module's and every difference is listed, instead of being dropped silently as the
original did (which made a ``module.``-prefixed WRN checkpoint load nothing).
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from utils.io import InputError, atomic_write

def save_checkpoint(path: str | os.PathLike, params: Mapping[str, torch.Tensor], **metadata) -> None:
    """Write ``{'params': params, **metadata}`` atomically (temp file + ``os.replace``).

    Metadata must be plain Python (numbers, strings, lists, dicts) or tensors so that it loads with
    ``weights_only=True``. torch serialises into memory first: its zip writer turns the ``OSError`` of a failed
    write into a ``RuntimeError`` of its own, while a plain write of the bytes fails with the ``OSError`` itself.
    """
    state = {"params": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in params.items()}}
    state.update(metadata)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint file safely; always returns a dict with a ``params`` state dict.

    Accepts ``{'params': sd}`` (ours and the original's), ``{'state_dict': sd}`` and a bare state dict.
    Raises :class:`InputError` for a missing, truncated or code-carrying file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch >= 2.6 opens with a paragraph about its default; the line naming the refused object says more
        lines = [line for line in str(err).splitlines() if line.strip()] or [""]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0])
        raise InputError(
            f"{path}: refused: the checkpoint carries pickled Python objects beyond tensors and plain data, which "
            f"could run code when loaded (torch.load weights_only=True said: {reason}). If you "
            f"trust its source, re-save just its tensors as {{'params': state_dict}}.") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise InputError(f"{path}: cannot read the checkpoint ({str(err).splitlines()[0]}); the file is "
                         f"probably truncated or not a PyTorch checkpoint. Re-download or re-create it.") from err
    if not isinstance(ckpt, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(ckpt).__name__}.")
    if isinstance(ckpt.get("params"), Mapping):
        ckpt = dict(ckpt)
    elif isinstance(ckpt.get("state_dict"), Mapping):
        ckpt = {**ckpt, "params": ckpt["state_dict"]}
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"params": ckpt}
    else:
        raise InputError(f"{path}: no 'params' or 'state_dict' entry and not a bare state dict "
                         f"(top-level keys: {sorted(ckpt)[:10]}).")
    if is_release_meta(ckpt["params"]):
        ckpt = from_release_meta(ckpt, path)
    return ckpt


# The release's meta checkpoints hold the semantic regressor in its functional form, each tensor twice:
# fc1_w/fc1_b as attributes and vars.0/vars.1 in its parameter list. Our name for each, and its twin.
RELEASE_REGRESSOR = {"word_learner.fc1_w": ("word_learner.weight", "word_learner.vars.0"),
                     "word_learner.fc1_b": ("word_learner.bias", "word_learner.vars.1")}


def is_release_meta(params: Mapping[str, torch.Tensor]) -> bool:
    """True for a meta checkpoint saved by the original release (its regressor keys ``word_learner.fc1_w``...)."""
    return any(key.split("module.")[-1] == "word_learner.fc1_w" for key in params)


def from_release_meta(ckpt: dict, path: str | os.PathLike) -> dict:
    """The release's meta checkpoint in our layout: ``{'params': feat_learner.* + word_learner.{weight,bias}}``.

    Its ``encoder.*`` (a randomly initialised backbone the meta stage never uses) is dropped; each regressor
    tensor must equal its saved twin; the class-vector size D is read from the file (the release hard-codes
    300, or 312 on CUB). The regressor is kept in the state the release carried it to, so that an evaluation
    with ``--inner_state carry`` continues from it as the release's own evaluation does.
    """
    params = {key.split("module.")[-1]: value for key, value in ckpt["params"].items()}
    mapped = {key: value for key, value in params.items() if key.startswith("feat_learner.")}
    for release_key, (our_key, twin_key) in RELEASE_REGRESSOR.items():
        if release_key not in params:
            raise InputError(f"{path}: a release meta checkpoint needs {release_key}, which is missing "
                             f"(found: {sorted(params)[:8]}...).")
        if twin_key in params and not torch.equal(params[twin_key], params[release_key]):
            raise InputError(f"{path}: {release_key} and {twin_key} should be the same tensor saved twice, "
                             f"but they differ; the file is damaged or was edited.")
        mapped[our_key] = params[release_key]
    known = {"feat_learner.weight", "feat_learner.bias", *RELEASE_REGRESSOR,
             *(twin for _, twin in RELEASE_REGRESSOR.values())}
    unexpected = [key for key in params if key not in known and not key.startswith("encoder.")]
    if unexpected or "feat_learner.weight" not in mapped:
        missing = "" if "feat_learner.weight" in mapped else "feat_learner.weight is missing; "
        raise InputError(f"{path}: not the release's meta layout ({missing}unexpected keys: {unexpected[:8]}).")
    semantic_dim = int(mapped["feat_learner.weight"].shape[0])
    return {**{k: v for k, v in ckpt.items() if k != "params"}, "params": mapped, "kind": "meta",
            "release": True, "semantic_dim": semantic_dim, "inner_state": "carry"}


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the wrapper prefixes ``module.``, ``_orig_mod.`` and ``encoder.`` (in any combination).

    When some keys carry ``encoder.`` (the original saved its whole model, backbone under ``encoder.``), only
    those keys are kept: the rest (e.g. the pretraining classifier ``pre_fc.*``) belongs to other modules.
    """
    def clean(key: str) -> str:
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        return key

    cleaned = {clean(k): v for k, v in state_dict.items()}
    if any(k.startswith("encoder.") for k in cleaned):
        cleaned = {k[len("encoder."):]: v for k, v in cleaned.items() if k.startswith("encoder.")}
    return cleaned


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                      limit: int = 8) -> str:
    """A readable list of the keys missing, unexpected, or of another shape; empty when they fit."""
    def show(keys: list[str]) -> str:
        more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {show(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (checkpoint vs model): {show(shapes)}")
    return "; ".join(parts)


# Where each kind of checkpoint comes from, for the message when the other kind is passed.
_KIND_SOURCES = {"backbone": "--init_weights takes a backbone: the max_acc.pth of run_pre.py",
                 "meta": "--eval_weights takes a meta model: the max_acc.pth of run_fusion.py or "
                         "run_concatenation.py"}


def load_weights(module: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu",
                 kind: str | None = None) -> dict:
    """Load a checkpoint into ``module`` after checking every key and shape; returns the checkpoint dict.

    Args:
        kind: when given (``"backbone"`` or ``"meta"``) and the checkpoint says it is another kind, refuse it
            with a message that says so (e.g. a backbone passed to ``--eval_weights``).
    """
    ckpt = load_checkpoint(path, map_location)
    if kind is not None and ckpt.get("kind", kind) != kind:
        raise InputError(f"{path}: this is a {ckpt['kind']} checkpoint, but a {kind} checkpoint is needed here "
                         f"({_KIND_SOURCES[kind]}).")
    state_dict = strip_prefixes(ckpt["params"])
    problem = describe_mismatch(module.state_dict(), state_dict)
    if problem:
        raise InputError(f"{path}: the checkpoint does not fit {type(module).__name__} ({problem}). "
                         f"Is it for another architecture, dataset or feature dimension?")
    module.load_state_dict(state_dict, strict=True)
    return ckpt
