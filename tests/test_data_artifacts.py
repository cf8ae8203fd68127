import gzip
import struct

import numpy as np
import pytest
import torch

import spot_compile as sc
from spot_compile.data.datasets import load_dataset
from spot_compile.data.idx import read_idx
from spot_compile.errors import CheckpointError, DataError

from .conftest import small_vit


def _write_idx(path, array, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _idx_dir(tmp_path, n=12, size=8):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, size, size)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


def test_idx_loader_reads_what_was_written(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.idx", arr, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), arr)
    data = load_dataset(_idx_dir(tmp_path), "test", img_size=8)
    assert data.images.shape == (12, 1, 8, 8) and data.images.max() <= 1.0 and data.labels.dtype == torch.int64


def test_idx_loader_resizes_to_the_model(tmp_path):
    assert load_dataset(_idx_dir(tmp_path), "train", img_size=16).images.shape == (12, 1, 16, 16)


def test_missing_and_corrupt_data(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        load_dataset(tmp_path / "nope", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither an IDX directory"):
        load_dataset(tmp_path / "empty", "test")
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="is an ImageFolder tree; .* read a tree with spot_compile.data.datasets"):
        load_dataset(tmp_path / "tree", "test")
    d = _idx_dir(tmp_path / "d") if (tmp_path / "d").mkdir() is None else None
    raw = gzip.open(d / "t10k-images-idx3-ubyte.gz").read()
    gzip.open(d / "t10k-images-idx3-ubyte.gz", "wb").write(raw[:-10])
    with pytest.raises(DataError, match="corrupt"):
        load_dataset(d, "test", img_size=8)
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(d / "t10k-labels-idx1-ubyte.gz")


def test_artifact_refuses_another_model_and_a_truncated_file(tmp_path):
    model = small_vit()
    sparse = sc.sparsify(model, sc.SparsifyConfig(budget=0.6))
    path = tmp_path / "s.pt"
    sc.save(sparse, model, path)
    with pytest.raises(CheckpointError, match="different model"):
        sc.load(path, small_vit(dim=48))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        sc.load(path, model)
    with pytest.raises(CheckpointError, match="not found"):
        sc.load(tmp_path / "missing.pt", model)


def test_input_of_the_wrong_size_is_refused_at_call_time():
    sparse = sc.sparsify(small_vit(), sc.SparsifyConfig(budget=0.6))
    with pytest.raises(sc.errors.InputSizeError, match="does not match"):
        sparse(torch.randn(1, 1, 20, 20))


def test_stored_configs_carry_their_version_and_old_unversioned_ones_still_read(tmp_path):
    import json

    from spot_compile.scorers.spot import PredictorConfig
    from spot_compile.serialization.configs import config_from_dict, config_to_dict

    config = sc.SparsifyConfig(budget=0.5, stages=(1, 2), keep=(40, 20), policy=sc.ClassAttentionConfig(fuse=True))
    stored = json.loads(json.dumps(config_to_dict(config)))
    assert stored["_type"] == "SparsifyConfig" and stored["_version"] == 2
    assert stored["policy_config"] == {"_type": "ClassAttentionConfig", "_version": 1, "fuse": True}
    assert config_from_dict(stored, sc.SparsifyConfig, "f") == config
    # version 1, as files stored it before policies had configs: the name and the flat shorthands
    unversioned = {k: v for k, v in stored.items() if not k.startswith("_") and k != "policy_config"}
    assert config_from_dict(unversioned, sc.SparsifyConfig, "f") == config
    for bad, message in (({**stored, "policy_config": {**stored["policy_config"], "_version": 7}}, "settings version 7"),
                         ({**stored, "policy_config": {"fuse": True, "depth": 2}}, "settings this release does not know (depth)"),
                         ({**stored, "policy": "gone", "policy_config": {}}, "token policy 'gone', which is not installed")):
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config_from_dict(bad, sc.SparsifyConfig, "f")
    # the shipped predictors' record: no version, no anchor (off for them); a version-1 file that stored the
    # withdrawn anchor reads when it was off, and is refused in one line when it was on
    assert config_from_dict({"hidden": 16, "signals": ["embedding"], "coverage": 2.0}, PredictorConfig, "f") == \
        PredictorConfig(hidden=16, signals=("embedding",), coverage=2.0)
    assert config_from_dict({"_version": 1, "hidden": 16, "anchor": False}, PredictorConfig, "f") == PredictorConfig(hidden=16)
    with pytest.raises(CheckpointError, match="holds anchored predictors, a variant this release no longer builds"):
        config_from_dict({"_version": 1, "hidden": 16, "anchor": True}, PredictorConfig, "f")
    with pytest.raises(CheckpointError, match=r"does not know \(anchor\)"):
        config_from_dict({"_version": 2, "hidden": 16, "anchor": False}, PredictorConfig, "f")
    for bad, message in (({**stored, "_version": 99}, "version 99; this release reads versions 1 to 2"),
                         ({**stored, "sharpness": 2}, "settings this release does not know (sharpness)"),
                         ({**stored, "_type": "PredictorConfig"}, "holds a PredictorConfig where a SparsifyConfig belongs")):
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config_from_dict(bad, sc.SparsifyConfig, "f")
