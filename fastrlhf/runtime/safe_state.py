"""Reading a ``torch.distributed.checkpoint`` folder (a checkpoint's ``state/``) without running pickled code.

DCP keeps the folder's index in ``.metadata`` as a pickle and non-tensor items (optimizer hyper-parameters) as pickles
inside the shard files. ``SafeStateReader`` reads ``.metadata`` with an unpickler that builds only DCP's own metadata
types (plus torch.Size, dtypes and layouts), and checks that every shard it names is a plain file of the folder;
``SafeLoadPlanner`` loads the non-tensor items with ``torch.load(weights_only=True)`` (tensors are already read that
way). Anything else is refused with ``StateRefused`` before it is built.
"""
from __future__ import annotations

import pathlib
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, metadata as M
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

METADATA_FILE = ".metadata"


class StateRefused(pickle.UnpicklingError):
    """A file of a checkpoint holds something a checkpoint never holds (e.g. a reference to a function); refused."""


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("torch.distributed.checkpoint.metadata", name): getattr(M, name)
        for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # name -> torch.strided etc.
    for mod in ("pathlib", "pathlib._local"):  # StorageMeta.checkpoint_id: kept as a pure path (no file access)
        allowed[(mod, "PosixPath")] = allowed[(mod, "PurePosixPath")] = pathlib.PurePosixPath
        allowed[(mod, "WindowsPath")] = allowed[(mod, "PureWindowsPath")] = pathlib.PureWindowsPath
    for name, value in vars(torch).items():  # dtypes (torch.float32, ...), pickled as attributes of torch
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    _allowed: dict | None = None

    def find_class(self, module: str, name: str):
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        try:
            return _MetadataUnpickler._allowed[(module, name)]
        except KeyError:
            raise StateRefused(f"it refers to {module}.{name}, which a checkpoint's metadata never holds "
                               f"(refused; nothing from the file was run)") from None

    def persistent_load(self, pid):
        raise StateRefused("it holds a persistent reference, which a checkpoint's metadata never holds (refused)")


_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def read_metadata(path) -> M.Metadata:
    """The checked ``Metadata`` of a DCP folder ``path`` (its ``.metadata``). Raises ``StateRefused`` (naming the
    file) for anything but DCP metadata whose shards are plain files of ``path``; OSError if it cannot be read."""
    f = Path(path) / METADATA_FILE
    with open(f, "rb") as fh:
        try:
            md = _MetadataUnpickler(fh).load()
        except StateRefused as e:
            raise StateRefused(f"{f}: {e}") from None
        except Exception as e:  # truncated / not a pickle / wrong arguments to an allowed type
            raise StateRefused(f"{f}: not a readable checkpoint metadata file ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    problem = _check_metadata(md)
    if problem:
        raise StateRefused(f"{f}: {problem}")
    return md


def _check_metadata(md) -> str:
    if not isinstance(md, M.Metadata):
        return f"not a checkpoint's metadata (it holds a {type(md).__name__})"
    if not isinstance(md.state_dict_metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, (M.TensorStorageMetadata, M.BytesStorageMetadata))
            for k, v in md.state_dict_metadata.items()):
        return "not a checkpoint's metadata (state_dict_metadata is not a map of item name -> storage metadata)"
    if not isinstance(md.storage_data, dict):
        return "not a checkpoint's metadata (storage_data is not a map of item -> shard location)"
    for key, info in md.storage_data.items():
        if not isinstance(key, M.MetadataIndex) or not isinstance(info, _StorageInfo):
            return "not a checkpoint's metadata (storage_data is not a map of item -> shard location)"
        name = info.relative_path
        if not isinstance(name, str) or not _SHARD_NAME.match(name) or name in (".", ".."):
            return f"item '{key.fqn}' names the shard {name!r}, which is not a file of this folder (refused)"
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (info.offset, info.length)):
            return f"item '{key.fqn}': bad offset/length in the shard"
        if info.transform_descriptors is not None and not (
                isinstance(info.transform_descriptors, (list, tuple))
                and all(isinstance(t, str) for t in info.transform_descriptors)):
            return f"item '{key.fqn}': bad transform descriptors"
    return ""


class SafeStateReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read by ``read_metadata`` (no arbitrary unpickling)."""

    def read_metadata(self, *args, **kwargs) -> M.Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank metadata files: fastrlhf writes none
            raise StateRefused(f"{Path(self.path)}: no per-rank metadata in a fastrlhf checkpoint")
        md = read_metadata(self.path)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = M.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that loads non-tensor items with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:
            raise StateRefused(f"item '{fqn}': {refusal(e)}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def refusal(e: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)`` (torch's own message is several lines, and advises the
    unsafe ``weights_only=False``)."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(e, pickle.UnpicklingError) and m:
        return f"it refers to {m.group(1)}, which a checkpoint never holds (refused; nothing from the file was run)"
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        lines = [s for s in text.splitlines()[1:] if s.strip() and "weights_only" not in s and "torch.load" not in s]
        return f"it holds objects a checkpoint never holds (refused; nothing from the file was run): " \
               f"{lines[0].strip() if lines else 'unsupported content'}"
    first = text.splitlines()[0] if text else ""
    return f"unreadable ({type(e).__name__}{': ' + first if first else ''})"
