"""Fuzzing every delta reader (run by test_delta_fuzz.py in a subprocess, so that a crash
fails that test instead of killing pytest; not collected on its own).

Files written by gym carry a checksum (gym_core.deltas.delta.content_digest): any damage to a
file (truncated, extended, bits flipped in the header or the data, garbage) must be
refused by :func:`read_delta` with a GymError naming the file. Damage that keeps the
file well-formed (a damaged writer: the checksum matches what it wrote) is fuzzed on the
PackedDelta itself: each decoder must refuse it with a GymError naming the tensor or the
metadata, or decode it into finite fp32 tensors of exactly the recorded shapes. No
other exception, never a read past a buffer.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.contracts.quantizer import model_like_delta
from gym_core.deltas.aggregate import make_soup
from gym_core.deltas.delta import FullPrecision, PackedDelta, load_packed, read_delta, save_packed
from gym_core.plugin.startup import bootstrap

PLUGINS = bootstrap()
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def quantizer(name: str, **opts):
    comp = PLUGINS.component("quant", name)
    return comp.load()(OmegaConf.merge(OmegaConf.structured(comp.config), opts))


#: every reader: BitDelta, DeltaQuant in every mode and granularity, full precision
READERS = {
    "bitdelta": quantizer("bitdelta"),
    "none": FullPrecision(),
    **{f"deltaquant-{mode}-{bits}-{'sym' if sym else 'asym'}-{gran}": quantizer(
        "deltaquant", mode=mode, bits=bits, symmetric=sym, granularity=gran, group_size=64)
       for mode, bits, sym in [("kbit", 2, True), ("kbit", 3, False), ("kbit", 4, True),
                               ("kbit", 4, False), ("kbit", 8, True), ("binary", 1, True),
                               ("ternary", 2, True)]
       for gran in ("tensor", "channel", "group")},
}
DELTA = {k: v[:24, :72] if v.dim() == 2 else v[:72] for k, v in model_like_delta(3).items()}
PACKED = {name: q.quantize(DELTA) for name, q in READERS.items()}
names = st.sampled_from(sorted(READERS))


def decoded_or_refused(reader, packed: PackedDelta) -> None:
    """The decoder's only two acceptable answers."""
    try:
        out = reader.dequantize(packed)
    except GymError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    shapes = json.loads(packed.meta["shapes"])
    assert set(out) == set(shapes)
    for key, t in out.items():
        assert t.dtype == torch.float32 and list(t.shape) == shapes[key], key
        assert bool(torch.isfinite(t).all()), key


# ----------------------------------------------------------------------------------------
# damaged files: always refused, naming the file
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deltas")
    out = {}
    for name, packed in PACKED.items():
        out[name] = folder / f"{name}.safetensors"
        save_packed(packed, out[name])
    return out


def refused(path) -> str:
    with pytest.raises(GymError) as info:
        read_delta(path, PLUGINS)
    assert str(path) in str(info.value), info.value
    return str(info.value)


@FUZZ
@given(name=names, cut=st.floats(0.0, 0.999))
def test_truncated_files(files, tmp_path_factory, name, cut):
    data = files[name].read_bytes()
    path = tmp_path_factory.mktemp("cut") / "d.safetensors"
    path.write_bytes(data[: int(len(data) * cut)])
    refused(path)


@FUZZ
@given(name=names, extra=st.binary(min_size=1, max_size=64))
def test_extended_files(files, tmp_path_factory, name, extra):
    path = tmp_path_factory.mktemp("long") / "d.safetensors"
    path.write_bytes(files[name].read_bytes() + extra)
    refused(path)


@FUZZ
@given(name=names, where=st.floats(0.0, 0.999), bit=st.integers(0, 7),
       header=st.booleans())
def test_bit_flips_anywhere(files, tmp_path_factory, name, where, bit, header):
    """A flipped bit in the header (lengths, names, dtypes, shapes, offsets, metadata) or
    in the tensor data."""
    data = bytearray(files[name].read_bytes())
    head = 8 + int.from_bytes(data[:8], "little")
    i = int(where * head) if header else head + int(where * (len(data) - head))
    data[i] ^= 1 << bit
    path = tmp_path_factory.mktemp("flip") / "d.safetensors"
    path.write_bytes(bytes(data))
    refused(path)


@FUZZ
@given(junk=st.binary(max_size=512))
def test_garbage_files(tmp_path_factory, junk):
    path = tmp_path_factory.mktemp("junk") / "d.safetensors"
    path.write_bytes(junk)
    refused(path)


def test_files_without_a_checksum_are_refused(files, tmp_path):
    """A file without the checksum gym writes with every delta was written by another
    tool or edited: refused by name (its content may be anything)."""
    from safetensors.torch import save_file

    packed = PACKED["bitdelta"]
    path = tmp_path / "old.safetensors"
    save_file(dict(packed.tensors), str(path), metadata=dict(
        packed.meta, num_params=str(packed.num_params)))
    assert "no checksum" in refused(path)
    # read on purpose (to re-save it), its tensors are still checked against its metadata
    assert set(READERS["bitdelta"].dequantize(
        load_packed(path, require_checksum=False))) == set(DELTA)
    cut = dict(packed.tensors)
    cut["model.layers.0.self_attn.q_proj.weight.signs"] = torch.zeros(1, dtype=torch.uint8)
    save_file(cut, str(path), metadata=dict(packed.meta, num_params=str(packed.num_params)))
    with pytest.raises(GymError, match="q_proj.weight.signs"):
        READERS["bitdelta"].dequantize(load_packed(path, require_checksum=False))


# ----------------------------------------------------------------------------------------
# well-formed files with wrong content: refused by name, or decoded to the recorded shapes
# ----------------------------------------------------------------------------------------

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.float32,
          torch.float64, torch.bfloat16, torch.bool]


@FUZZ
@given(name=names, data=st.data())
def test_resized_tensors(name, data):
    """Truncated to any length (down to 0 or 1 entry) or oversized: refused by name."""
    packed = PACKED[name]
    target = data.draw(st.sampled_from(sorted(packed.tensors)))
    t = packed.tensors[target].reshape(-1)
    size = data.draw(st.integers(0, 2 * t.numel() + 8).filter(lambda n: n != t.numel()))
    grown = t.repeat(size // max(t.numel(), 1) + 1)[:size] if t.numel() else torch.zeros(
        size, dtype=t.dtype)
    bad = PackedDelta({**packed.tensors, target: grown.clone()}, dict(packed.meta),
                      packed.num_params)
    with pytest.raises(GymError, match=re.escape(target)):
        READERS[name].dequantize(bad)


@FUZZ
@given(name=names, data=st.data())
def test_wrongly_typed_tensors(name, data):
    packed = PACKED[name]
    target = data.draw(st.sampled_from(sorted(packed.tensors)))
    t = packed.tensors[target]
    dtype = data.draw(st.sampled_from([d for d in DTYPES if d != t.dtype]))
    bad = PackedDelta({**packed.tensors, target: t.to(dtype)}, dict(packed.meta),
                      packed.num_params)
    with pytest.raises(GymError, match=re.escape(target)):
        READERS[name].dequantize(bad)


@FUZZ
@given(name=names, data=st.data())
def test_missing_and_unknown_tensors(name, data):
    packed = PACKED[name]
    tensors = dict(packed.tensors)
    if data.draw(st.booleans()):
        del tensors[data.draw(st.sampled_from(sorted(tensors)))]
    else:
        tensors[data.draw(st.text(min_size=1, max_size=20))] = torch.zeros(3)
    if tensors.keys() == packed.tensors.keys():
        return  # the drawn name was an existing one
    with pytest.raises(GymError):
        READERS[name].dequantize(PackedDelta(tensors, dict(packed.meta), packed.num_params))


shape_values = st.one_of(
    st.lists(st.integers(-3, 2**41), max_size=10), st.integers(), st.text(max_size=5),
    st.lists(st.floats(allow_nan=True), max_size=3), st.none())


@FUZZ
@given(name=names, data=st.data())
def test_damaged_shapes_metadata(name, data):
    """A recorded shape changed (to any JSON value), a tensor's entry dropped or invented,
    or the whole entry not JSON: refused, or (a shape with the same number of entries)
    decoded to exactly the recorded shapes."""
    packed = PACKED[name]
    shapes = json.loads(packed.meta["shapes"])
    how = data.draw(st.sampled_from(["change", "permute", "drop", "add", "text"]))
    key = data.draw(st.sampled_from(sorted(shapes)))
    if how == "change":
        shapes[key] = data.draw(shape_values)
    elif how == "permute":
        shapes[key] = list(reversed(shapes[key])) + data.draw(st.sampled_from([[], [1]]))
    elif how == "drop":
        del shapes[key]
    elif how == "add":
        shapes[data.draw(st.text(max_size=12))] = data.draw(shape_values)
    raw = data.draw(st.text(max_size=40)) if how == "text" else json.dumps(shapes)
    decoded_or_refused(READERS[name], PackedDelta(packed.tensors, dict(packed.meta, shapes=raw),
                                                  packed.num_params))


@FUZZ
@given(name=names, data=st.data())
def test_damaged_settings_metadata(name, data):
    """The decoder's settings (quantizer name, mode, bits, symmetry, granularity, group
    size, sign of zero) replaced by any string, or dropped."""
    packed = PACKED[name]
    meta = dict(packed.meta)
    key = data.draw(st.sampled_from(sorted(k for k in meta if k != "shapes")))
    if data.draw(st.booleans()):
        meta[key] = data.draw(st.one_of(
            st.sampled_from(["kbit", "binary", "ternary", "tensor", "channel", "group", "true",
                             "false", "0", "1", "2", "3", "4", "5", "8", "16", "-1", "64",
                             "9999999999", "bitdelta", "deltaquant", "none", ""]),
            st.text(max_size=8)))
    else:
        del meta[key]
    decoded_or_refused(READERS[name], PackedDelta(packed.tensors, meta, packed.num_params))


@FUZZ
@given(name=names, data=st.data())
def test_non_finite_values(name, data):
    """A NaN or infinity in a scale or a stored value: refused (it would spread over a
    whole matrix, or a whole soup)."""
    packed = PACKED[name]
    floats = sorted(k for k, t in packed.tensors.items() if t.is_floating_point())
    target = data.draw(st.sampled_from(floats))
    t = packed.tensors[target].clone()
    t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(
        st.sampled_from([math.nan, math.inf, -math.inf]))
    with pytest.raises(GymError, match="NaN or infinite"):
        READERS[name].dequantize(PackedDelta({**packed.tensors, target: t}, dict(packed.meta),
                                             packed.num_params))


# ----------------------------------------------------------------------------------------
# the soup's readers
# ----------------------------------------------------------------------------------------


@FUZZ
@given(name=names, where=st.floats(0.0, 0.999), bit=st.integers(0, 7))
def test_a_soup_refuses_a_damaged_input_by_name(files, tmp_path_factory, name, where, bit):
    from gym_soup import MeanConfig

    folder = tmp_path_factory.mktemp("soup")
    data = bytearray(files[name].read_bytes())
    data[int(where * len(data))] ^= 1 << bit
    bad = folder / "bad.safetensors"
    bad.write_bytes(bytes(data))
    cfg = OmegaConf.structured(MeanConfig(inputs=[str(files[name]), str(bad)]))
    with pytest.raises(GymError, match=re.escape(str(bad))):
        make_soup(cfg, folder / "out", PLUGINS)
    assert not (folder / "out" / "soup.safetensors").exists()


def test_a_soup_of_sound_inputs_is_read_back(files, tmp_path):
    from gym_soup import MeanConfig

    cfg = OmegaConf.structured(MeanConfig(inputs=[str(files["bitdelta"]),
                                                  str(files["deltaquant-kbit-4-sym-group"])]))
    report = make_soup(cfg, tmp_path, PLUGINS)
    merged = read_delta(report["output"], PLUGINS)  # the soup's own file, checked too
    assert {k: list(v.shape) for k, v in merged.items()} == {
        k: list(v.shape) for k, v in DELTA.items()}
    assert load_packed(report["output"]).meta["soup"] == "mean"
