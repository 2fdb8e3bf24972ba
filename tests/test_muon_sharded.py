"""Sharded Muon (optim.muon_sharded: reduce-scatter the grads, orthogonalise the local slice, all-gather) on
2 CPU processes over gloo equals the unsharded step on the mean gradient — for the optimizer alone, and for
the trainer (manual gradient sync, no DDP) against the DDP trainer.

Run: PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m pytest -q tests/test_muon_sharded.py   (~40 s on 2 loaded cores: one 2-process spawn)
"""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.shards import write_shard
from student.muon import Muon

SHAPES = [(24, 16)] * 3 + [(16, 40)] * 2 + [(8, 8)]  # 3 and 1 matrices: stacks padded to the world size
OPTS = {"lr": 0.026, "momentum": 0.97, "weight_decay": 0.095, "row_normalize": True, "coeffs": "polar_express"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.1) for s in SHAPES]


def _grads(rank: int, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(*s, generator=gen) for s in SHAPES]


def _sharded_optimizer(rank: int, out: str) -> None:
    ps = _params()
    opt = Muon(ps, sharded=True, **OPTS)
    for step in range(2):
        for p, g in zip(ps, _grads(rank, step), strict=True):
            p.grad = g
        opt.step()
    torch.save([p.detach() for p in ps], f"{out}/muon_rank{rank}.pt")


def _trainer_worker(rank: int, world: int, port: int, out: str, shards: str) -> None:
    _init(rank, world, port)
    from student.config import load_config
    from student.train import Trainer

    dist.init_process_group("gloo", rank=rank, world_size=world)  # the Accelerator adopts this group
    _sharded_optimizer(rank, out)
    for sharded in (False, True):  # DDP, then the record's manual sync, in the same process group
        cfg = load_config(None, [
            "--model.vocab_size", "64", "--model.num_layers", "2", "--model.model_dim", "32", "--model.num_heads",
            "2", "--model.num_kv_heads", "1", "--train.batch_tokens", "256", "--train.seq_len", "32",
            "--train.max_steps", "3", "--train.max_wallclock_s", "0", "--train.warmdown_steps", "0",
            "--data.train_shards", f"{shards}/fineweb_train_*.bin", "--data.val_shards", "", "--data.tokenizer", "",
            "--train.device", "cpu", "--optim.muon_sharded", str(sharded).lower(), "--optim.muon_coeffs",
            "polar_express", "--optim.muon_row_normalize", "true", "--optim.muon_wd", "0.095",
            "--optim.scalar_wd", "0.02", "--optim.embed_wd", "0.085"])
        tr = Trainer(cfg, out_dir=f"{out}/run{sharded}", log=False)
        assert tr.manual_sync is sharded
        for _ in range(3):
            tr.train_step()
        tr.loader.close()
        torch.save({k: v.detach().clone() for k, v in tr.model.state_dict().items()},
                   f"{out}/rank{rank}_{sharded}.pt")
    dist.destroy_process_group()


def test_sharded_muon_equals_unsharded_and_trainer_equals_ddp(tmp_path):
    """One spawn (process start-up dominates): the optimizer alone, then the trainer in both modes."""
    write_shard(tmp_path / "fineweb_train_000000.bin", np.random.default_rng(0).integers(0, 64, 20_000).astype(np.uint16))
    mp.spawn(_trainer_worker, args=(2, _free_port(), str(tmp_path), str(tmp_path)), nprocs=2)

    ps = _params()
    opt = Muon(ps, **OPTS)  # one process: the plain per-matrix step on the averaged gradient
    for step in range(2):
        for p, g0, g1 in zip(ps, _grads(0, step), _grads(1, step), strict=True):
            p.grad = (g0 + g1) / 2
        opt.step()
    r0, r1 = (torch.load(tmp_path / f"muon_rank{r}.pt") for r in range(2))
    for a, b, ref, w0 in zip(r0, r1, ps, _params(), strict=True):
        assert torch.equal(a, b)  # every rank ends with the same weights
        assert (a - ref.detach()).abs().max() < 1e-6
        assert (ref.detach() - w0.detach()).abs().max() > 1e-2

    for sharded in (False, True):
        s0, s1 = (torch.load(tmp_path / f"rank{r}_{sharded}.pt") for r in range(2))
        assert all(torch.equal(s0[k], s1[k]) for k in s0)  # ranks agree
    ddp, sh = (torch.load(tmp_path / f"rank0_{s}.pt") for s in (False, True))
    assert max((ddp[k] - sh[k]).abs().max().item() for k in ddp) < 1e-5
