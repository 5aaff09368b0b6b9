"""torchrun with 2 CPU ranks (gloo, FSDP2) against one process with the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _torchrun(args, timeout):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "dist_check.py")] + args
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_two_ranks_match_one_process(tmp_path, agg):
    r = subprocess.run([sys.executable, os.path.join(HERE, "dist_check.py"), str(tmp_path), "--loss_agg", agg],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _torchrun([str(tmp_path), "--loss_agg", agg], timeout=300)
    one, two = torch.load(tmp_path / "world1.pt"), torch.load(tmp_path / "world2.pt")
    assert one["losses"][:3] == pytest.approx(two["losses"][:3], abs=1e-5)       # SFT losses
    assert one["losses"][3] == pytest.approx(two["losses"][3], rel=1e-4)         # GRPO grad norm (~100: relative)
    assert one["state"].keys() == two["state"].keys()
    worst = max((one["state"][k].float() - two["state"][k].float()).abs().max().item() for k in one["state"])
    assert worst < 1e-5
    # and training did move the weights (the comparison is not between two untouched models)
    import common
    base = common.load_model(common.DEFAULT_MODEL, "cpu").model.state_dict()
    moved = max((one["state"][k].float() - base[k].float()).abs().max().item() for k in base)
    assert moved > 1e-4


def test_ranks_generating_different_lengths_do_not_hang(tmp_path):
    _torchrun([str(tmp_path), "--lengths"], timeout=180)
    assert (tmp_path / "lengths.txt").read_text().split() == ["1", "12"]
