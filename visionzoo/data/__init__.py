"""Datasets (embedded digits, ImageFolder, LMDB) and transforms.

Names are resolved lazily: ``transforms`` imports timm (slow), the dataset modules do not, so the CLI can use
``visionzoo.data.lmdb`` without paying for timm.
"""
import importlib

_EXPORTS = {
    "DigitsDataset": "datasets", "ImageFolderDataset": "datasets", "build_dataset": "datasets",
    "check_data_dir": "datasets", "write_digits_folder": "datasets", "CorruptImageWarning": "datasets",
    "DATASETS": "datasets",
    "LMDBDataset": "lmdb", "convert_to_lmdb": "lmdb", "read_lmdb_meta": "lmdb",
    "build_train_transform": "transforms", "build_eval_transform": "transforms", "build_mixup": "transforms",
    "resolve_eval_config": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
