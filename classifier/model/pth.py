"""PyTorch's legacy (pre-zip) `.pth` state dicts read as numpy arrays, without PyTorch and without
trusting the file.

A `.pth` is a pickle, and unpickling runs whatever callables the file names. The reader here admits
only what a state dict of tensors needs: `collections.OrderedDict`, PyTorch's tensor-rebuilding
function and its storage types, each replaced by a stand-in of ours that builds numpy arrays
(the same names `torch.load(weights_only=True)` admits). Any other name in the file refuses the
whole file before anything it names is called.

The legacy layout, as `torch.save(..., _use_new_zipfile_serialization=False)` writes it: four
pickles (a magic number, the protocol version, the writer's sizes, then the state dict, whose
storages are persistent ids), a pickled list of storage keys, then each storage's bytes in that
order, each after an 8-byte little-endian element count.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

#: The first pickle of a legacy file.
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

#: PyTorch's storage types, by the dtype of their elements.
STORAGE_TYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickle(ValueError):
    """The file names something a state dict of tensors does not need: it is refused unread."""


class NotAStateDict(ValueError):
    """The file is not a legacy PyTorch state dict that can be read."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_TYPES[self.name])


@dataclass
class _Storage:
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # filled once the storages' bytes are read


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        assert self.storage.data is not None
        if any(n < 0 for n in self.size) or any(s < 0 for s in self.stride) or len(self.size) != len(self.stride):
            raise NotAStateDict(f"a tensor of size {self.size} and stride {self.stride}")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if self.offset < 0 or (0 not in self.size and last >= self.storage.numel):
            raise NotAStateDict(f"a tensor of size {self.size} reaches beyond its storage of {self.storage.numel}")
        itemsize = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view)  # a copy: contiguous, independent of the storage


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_):
    if not isinstance(storage, _Storage):
        raise NotAStateDict(f"a tensor built on {type(storage).__name__}, not on a storage")
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


#: Every name a state dict may use, and what stands for it here. Nothing else is ever looked up.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    **{("torch", name): _StorageType(name) for name in STORAGE_TYPES},
}


class _Unpickler(pickle.Unpickler):
    """Looks up only the names of `_ALLOWED` (its stand-ins); resolves storages by key."""

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage] | None = None) -> None:
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickle(
                f"it names {module}.{name}, which a state dict of tensors does not need "
                "(a pickle can run any function it names): refused, nothing in it was run"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self.storages is None or not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise NotAStateDict(f"an unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, numel, view = pid
        if not isinstance(kind, _StorageType) or view is not None:
            raise NotAStateDict(f"storage {key!r} is of an unsupported kind")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(kind.dtype, int(numel))
        return storage


def _load(file: IO[bytes], storages: dict[str, _Storage] | None = None) -> Any:
    return _Unpickler(file, storages).load()


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """{name: array} from a legacy `.pth` state dict, read without running anything it names.

    Raises UnsafePickle when the file names any callable a state dict does not need, and
    NotAStateDict when it is not a legacy state dict (a zip-format `.pth` among them).
    """
    path = Path(path)
    with path.open("rb") as file:
        if file.read(2) == b"PK":
            raise NotAStateDict(f"{path} is a zip-format .pth; only the legacy format is read")
        file.seek(0)
        try:
            if _load(file) != MAGIC_NUMBER or _load(file) != PROTOCOL_VERSION:
                raise NotAStateDict(f"{path} is not a legacy PyTorch file")
            sizes = _load(file)
            if not isinstance(sizes, dict) or not sizes.get("little_endian", False):
                raise NotAStateDict(f"{path} was written on a big-endian machine, which is not supported")
            storages: dict[str, _Storage] = {}
            state = _load(file, storages)
            keys = _load(file)
        except UnsafePickle as err:
            raise UnsafePickle(f"{path}: {err}") from None
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as err:
            if isinstance(err, NotAStateDict):
                raise
            raise NotAStateDict(f"{path} is not a legacy PyTorch state dict ({err})") from err
        if not isinstance(state, dict) or not isinstance(keys, list) or set(keys) != set(storages):
            raise NotAStateDict(f"{path} does not hold a state dict whose storages it lists")
        for key in keys:
            storage = storages[key]
            header = file.read(8)
            if len(header) != 8 or int.from_bytes(header, "little") != storage.numel:
                raise NotAStateDict(f"{path}: storage {key} is truncated or does not match its tensors")
            raw = file.read(storage.numel * storage.dtype.itemsize)
            if len(raw) != storage.numel * storage.dtype.itemsize:
                raise NotAStateDict(f"{path}: storage {key} is truncated")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    out = {}
    for name, value in state.items():
        if not isinstance(value, _Tensor):
            raise NotAStateDict(f"{path}: {name!r} is not a tensor")
        out[str(name)] = value.array()
    return out
