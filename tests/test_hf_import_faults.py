"""Import of damaged or malformed Hugging Face folders: a real small safetensors folder (three shards,
an index, config.json), mutated one way at a time, raises nothing but `HFFormatError` with a one-line
message naming the file at fault; a float tensor whose header declares integers is refused."""

import json
import shutil
import struct

import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

import zerojax as zj
from zerojax import models
from zerojax.hf import files, load_pretrained
from zerojax.hf.files import HFFileMissingError, HFFormatError
from zerojax.hf.mapping import expand, leaves_by_path

CONFIG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
          "max_position_embeddings": 32, "tie_word_embeddings": False}
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
NORM = "model.norm.weight"


def weights() -> dict[str, np.ndarray]:
    """Every Hugging Face tensor of the CONFIG model, random (norm scales near 1)."""
    _, abstract = models.abstract_model(CONFIG)
    shapes = {p: tuple(x.shape) for p, x in leaves_by_path(abstract).items()}
    rng = np.random.default_rng(0)
    out = {}
    for t in expand(models.tensor_map(CONFIG), shapes):
        value = rng.normal(0, 0.2, t.shape(shapes[t.path])).astype(np.float32)
        out[t.name] = value + 1 if t.name.endswith("norm.weight") else value
    return out


def write_folder(path, tensors: dict[str, np.ndarray]) -> None:
    """`tensors` as save_pretrained writes them: three safetensors shards, the index and config.json."""
    path.mkdir()
    wmap = {}
    for fname, names in zip(SHARDS, np.array_split(sorted(tensors), 3)):
        save_file({n: tensors[n] for n in names}, path / fname, metadata={"format": "pt"})
        wmap |= {str(n): fname for n in names}
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": wmap}
    (path / files.INDEX).write_text(json.dumps(index))
    (path / files.CONFIG).write_text(json.dumps(CONFIG))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(the folder, its tensors, a stage-3 plan of its model)."""
    tensors = weights()
    folder = tmp_path_factory.mktemp("hf") / "original"
    write_folder(folder, tensors)
    _, abstract = models.abstract_model(CONFIG)
    plan = zj.make_plan(abstract, optax.sgd(0.1), zj.ZeroRules(zj.make_mesh(), stage=3), zj.Precision.fp32())
    return folder, tensors, plan


# --- mutations: each edits a copy of the folder and returns the file the error must name -------------


def shard_of(folder, tensor: str) -> str:
    if not (folder / files.INDEX).exists():
        return files.SINGLE
    return json.loads((folder / files.INDEX).read_text())["weight_map"][tensor]


def split_file(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_file(path, header, data: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(folder, tensor: str, edit) -> str:
    """Applies `edit(entry)` to `tensor`'s header entry in its shard, keeping the data as it is."""
    path = folder / shard_of(folder, tensor)
    header, data = split_file(path)
    edit(header[tensor])
    join_file(path, header, data)
    return path.name


def edit_json(name: str, edit):
    def mutate(folder):
        data = json.loads((folder / name).read_text())
        result = edit(data)
        (folder / name).write_text(json.dumps(data if result is None else result))
        return name

    return mutate


def write_text(name: str, text: str | bytes):
    def mutate(folder):
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return name

    return mutate


def make_directory(name: str):
    def mutate(folder):
        (folder / name).unlink()
        (folder / name).mkdir()
        return name

    return mutate


def truncate(name: str, keep):
    def mutate(folder):
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[: keep(len(raw))])
        return name

    return mutate


def remove(name: str, named: str | None = None):
    def mutate(folder):
        (folder / name).unlink()
        return named or name

    return mutate


def header_length(value: int):
    def mutate(folder):
        raw = (folder / SHARDS[0]).read_bytes()
        (folder / SHARDS[0]).write_bytes(struct.pack("<Q", value) + raw[8:])
        return SHARDS[0]

    return mutate


def raw_header(blob: bytes):
    def mutate(folder):
        _, data = split_file(folder / SHARDS[1])
        join_file(folder / SHARDS[1], blob, data)
        return SHARDS[1]

    return mutate


def header_entry(tensor: str, key: str, value):
    return lambda folder: edit_header(folder, tensor, lambda entry: entry.__setitem__(key, value))


def wrong_index_entry(tensor: str, fname):
    return edit_json(files.INDEX, lambda d: d["weight_map"].__setitem__(tensor, fname))


def index_points_elsewhere(folder):
    """The index places a tensor in a shard that does not hold it."""
    data = json.loads((folder / files.INDEX).read_text())
    here = data["weight_map"][NORM]
    data["weight_map"][NORM] = next(f for f in SHARDS if f != here)
    (folder / files.INDEX).write_text(json.dumps(data))
    return data["weight_map"][NORM]


def drop_shards(folder) -> None:
    for fname in [*SHARDS, files.INDEX]:
        (folder / fname).unlink()


def single_file(edit):
    """The folder as one model.safetensors without an index, then `edit` applied to it."""
    def mutate(folder):
        drop_shards(folder)
        save_file(weights(), folder / files.SINGLE)
        return edit(folder)

    return mutate


def no_weights(folder):
    drop_shards(folder)
    return folder.name


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
MUTATIONS = {
    # config.json
    "config.json missing": remove(files.CONFIG),
    "config.json empty": write_text(files.CONFIG, ""),
    "config.json truncated": truncate(files.CONFIG, lambda n: n // 2),
    "config.json not UTF-8": write_text(files.CONFIG, b"\xff\xfe\x00{garbage"),
    "config.json a list": write_text(files.CONFIG, "[]"),
    "config.json a string": write_text(files.CONFIG, '"llama"'),
    "config.json nested 100000 deep": write_text(files.CONFIG, "[" * 100_000 + "]" * 100_000),
    "config.json a folder": make_directory(files.CONFIG),
    "hidden_size negative": edit_json(files.CONFIG, lambda c: c.update(hidden_size=-16)),
    "hidden_size a string": edit_json(files.CONFIG, lambda c: c.update(hidden_size="16")),
    "num_hidden_layers 0": edit_json(files.CONFIG, lambda c: c.update(num_hidden_layers=0)),
    "vocab_size 1e400": write_text(files.CONFIG, json.dumps(CONFIG).replace('"vocab_size": 64', '"vocab_size": 1e400')),
    "model_type a list": edit_json(files.CONFIG, lambda c: c.update(model_type=["llama"])),
    "model_type unknown": edit_json(files.CONFIG, lambda c: c.update(model_type="bert")),
    "rope_scaling a list": edit_json(files.CONFIG, lambda c: c.update(rope_scaling=[8.0])),
    "hidden_size of another model": edit_json(files.CONFIG, lambda c: c.update(hidden_size=32)),
    # model.safetensors.index.json
    "index empty": write_text(files.INDEX, ""),
    "index not JSON": write_text(files.INDEX, "{'weight_map': }"),
    "index a list": write_text(files.INDEX, "[]"),
    "index without weight_map": edit_json(files.INDEX, lambda d: {"metadata": d["metadata"]}),
    "weight_map a list": edit_json(files.INDEX, lambda d: d.update(weight_map=list(d["weight_map"]))),
    "weight_map entry an integer": wrong_index_entry(NORM, 5),
    "weight_map entry outside the folder": wrong_index_entry(NORM, "../config.json"),
    "weight_map entry an absolute path": wrong_index_entry(NORM, "/etc/hostname"),
    "weight_map names a missing shard": wrong_index_entry(NORM, "model-00004-of-00003.safetensors"),
    "weight_map without a tensor": edit_json(files.INDEX, lambda d: d["weight_map"].pop(Q_PROJ) and None),
    "weight_map with an unknown tensor": wrong_index_entry("model.layers.0.mlp.extra.weight", SHARDS[0]),
    "weight_map places a tensor in another shard": index_points_elsewhere,
    "index a folder": make_directory(files.INDEX),
    "shard missing": remove(SHARDS[2], files.INDEX),
    # the shards
    "shard empty": truncate(SHARDS[0], lambda n: 0),
    "shard of 4 bytes": truncate(SHARDS[0], lambda n: 4),
    "shard truncated in its header": truncate(SHARDS[0], lambda n: 40),
    "shard truncated in its data": truncate(SHARDS[0], lambda n: n - 100),
    "header length 2**63": header_length(2**63),
    "header length past the end": header_length(10**6),
    "header length zero": header_length(0),
    "header not JSON": raw_header(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'),
    "header a JSON list": raw_header(b"[]"),
    "header dtype I32": header_entry(NORM, "dtype", "I32"),
    "header dtype U32": header_entry(Q_PROJ, "dtype", "U32"),
    "header dtype unknown": header_entry(NORM, "dtype", "F33"),
    "header shape transposed": header_entry("model.layers.0.mlp.down_proj.weight", "shape", [32, 16]),
    "header shape disagrees with its bytes": header_entry(NORM, "shape", [17]),
    "header shape negative": header_entry(NORM, "shape", [-16]),
    "header offsets overlap": header_entry(NORM, "data_offsets", [0, 64]),
    "header offsets a string": header_entry(NORM, "data_offsets", "0-64"),
    "shard a folder": make_directory(SHARDS[1]),
    "single file truncated": single_file(truncate(files.SINGLE, lambda n: n // 2)),
    "single file header not JSON": single_file(write_text(files.SINGLE, struct.pack("<Q", 16) + b"{" * 16)),
    "single file dtype I32": single_file(header_entry(NORM, "dtype", "I32")),
    "no weights at all": no_weights,
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_malformed_folder_raises_only_the_library_error_naming_the_file(original, tmp_path, mutation):
    source, _, plan = original
    folder = tmp_path / "hf"
    shutil.copytree(source, folder)
    culprit = MUTATIONS[mutation](folder)
    with pytest.raises(HFFormatError) as raised:
        load_pretrained(folder, plan.param_shardings)
    message = str(raised.value)
    assert type(raised.value) in (HFFormatError, HFFileMissingError)
    assert raised.value.__cause__ is None and (raised.value.__context__ is None or raised.value.__suppress_context__)
    assert str(folder / culprit) in message or (culprit == folder.name and str(folder) in message), message
    assert "\n" not in message and len(message) < 1000, message


def test_float_tensor_declared_as_integers_is_refused(original, tmp_path):
    """A norm scale near 1 read as int32 would load as about 1.07e9."""
    source, _, plan = original
    folder = tmp_path / "hf"
    shutil.copytree(source, folder)
    culprit = folder / edit_header(folder, NORM, lambda entry: entry.__setitem__("dtype", "I32"))
    with pytest.raises(HFFormatError, match=r"tensor 'model\.norm\.weight' is stored as I32, but parameter "
                                            r"'norm\.scale' is float32 and needs a floating dtype") as raised:
        load_pretrained(folder, plan)
    assert str(raised.value).startswith(f"{culprit}: ")


def test_the_unmutated_folder_loads(original, tmp_path):
    source, tensors, plan = original
    params = load_pretrained(source, plan)
    np.testing.assert_array_equal(np.asarray(params["norm"]["scale"][...]), tensors[NORM])
    q = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][...])
    np.testing.assert_array_equal(q[0], tensors[Q_PROJ].T)
