"""The fair-policies benchmark's evaluation cache: a resumed sweep must never reuse a measurement of another setup
or of a checkpoint that has since been re-tuned."""
import os

import torch

from research.fair_policies import EvaluationCache


def _checkpoint(tmp_path, content: bytes, mtime_ns: int):
    path = tmp_path / "arm.pt"
    path.write_bytes(content)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_a_measurement_comes_back_with_its_token_maps(tmp_path):
    ckpt = _checkpoint(tmp_path, b"tuned", 10**18)
    maps = [torch.tensor([[True, False, True], [False, False, True]]), torch.tensor([[True, False, False], [False, False, True]])]
    cache = EvaluationCache(tmp_path / "evaluations.jsonl", (1, 2, 4), 0, 2000)
    cache.put({"arm": "random", "budget": 0.4, "top1": 61.4}, ckpt, maps)
    cache.put({"arm": "merge", "budget": 0.3, "reachable": False}, ckpt, None)

    again = EvaluationCache(tmp_path / "evaluations.jsonl", (1, 2, 4), 0, 2000)  # a new process reads the file
    row, back = again.get("random", 0.4, ckpt)
    assert row == {"arm": "random", "budget": 0.4, "top1": 61.4}
    assert len(back) == 2 and all(torch.equal(a, b) and b.dtype == torch.bool for a, b in zip(maps, back))
    assert again.get("merge", 0.3, ckpt) == ({"arm": "merge", "budget": 0.3, "reachable": False}, None)
    assert again.get("random", 0.6, ckpt) is None
    assert again.get("merge", 0.4, ckpt) is None


def test_another_setup_or_a_retuned_checkpoint_is_measured_again(tmp_path):
    ckpt = _checkpoint(tmp_path, b"tuned", 10**18)
    EvaluationCache(tmp_path / "e.jsonl", (1, 2, 4), 0, 2000).put({"arm": "random", "budget": 0.4, "top1": 1.0}, ckpt, None)
    assert EvaluationCache(tmp_path / "e.jsonl", (1, 2, 4), 0, 2000).get("random", 0.4, ckpt) is not None
    assert EvaluationCache(tmp_path / "e.jsonl", (2, 4), 0, 2000).get("random", 0.4, ckpt) is None
    assert EvaluationCache(tmp_path / "e.jsonl", (1, 2, 4), 500, 2000).get("random", 0.4, ckpt) is None
    assert EvaluationCache(tmp_path / "e.jsonl", (1, 2, 4), 0, 100).get("random", 0.4, ckpt) is None
    retuned = _checkpoint(tmp_path, b"tuned again", 2 * 10**18)
    assert EvaluationCache(tmp_path / "e.jsonl", (1, 2, 4), 0, 2000).get("random", 0.4, retuned) is None
