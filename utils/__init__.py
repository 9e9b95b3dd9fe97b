"""Small helpers shared by every stage: atomic file writes, seeding, the device decision, statistics."""
from utils.io import InputError, SaveError, atomic_write, load_npz, save_json, save_npz, JsonlLog
from utils.runtime import REPO_ROOT, git_commit, resolve_device, resolve_path, set_seed
from utils.stats import mean_ci95

__all__ = [
    "InputError", "SaveError", "atomic_write", "load_npz", "save_json", "save_npz", "JsonlLog",
    "REPO_ROOT", "git_commit", "resolve_device", "resolve_path", "set_seed", "mean_ci95",
]
