"""ovseg-train under torch.distributed: two CPU processes (gloo) end with identical weights."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from conftest import write_colour_regions

from ovseg.export.clip import tiny_clip
from ovseg.export.train.data import CropConfig
from ovseg.export.train.engine import TrainConfig, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, data, out, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    crop = CropConfig(short_side=96, max_size=200, crop=64, clip_size=64, mask_size=32)
    cfg = TrainConfig(data=data, out=out, iters=3, batch=4, prompts=8, workers=0, vocab=None, crop=crop, lr=1e-3)
    result = train(cfg, clip_model=tiny_clip())
    state = {f"student.{k}": v for k, v in result.student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in result.teacher.visual.state_dict().items()})
    state["losses"] = torch.tensor(result.losses)
    torch.save(state, results / f"rank{rank}.pt")


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    data = write_colour_regions(tmp_path / "data", count=8)
    mp.spawn(_rank, args=(2, _free_port(), data, tmp_path / "out", tmp_path), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys()
    different = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not different, different[:5]
    initial = tiny_clip().visual.state_dict()
    assert not torch.equal(
        r0["student.dense.visual.transformer.resblocks.0.attn.in_proj_weight"],
        initial["transformer.resblocks.0.attn.in_proj_weight"],
    )
    assert (tmp_path / "out" / "student_visual.safetensors").is_file()
    assert len((tmp_path / "out" / "log.csv").read_text().splitlines()) == 1 + 3
