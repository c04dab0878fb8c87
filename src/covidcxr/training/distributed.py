"""Where a process sits in a training job: a plain process is a world of one, torchrun's processes join one group.

Apart from the loop because only two moments of a run depend on it: joining the job at the start, and at the end
checking that every rank holds the same weights (DDP promises that; a desync bug would break it silently).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from covidcxr.config import save_json
from covidcxr.model.network import unwrap


@dataclass
class Dist:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0, the one process that writes files and logs progress."""
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """Join the torchrun job when launched by torchrun (NCCL on CUDA, gloo on CPUs); otherwise a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":  # NCCL's object collectives (all_gather_object) use the current device
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return Dist(dist.get_rank(), world, local_rank)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers, in state-dict order: equal weights, equal digest."""
    digest = hashlib.sha256()
    for value in unwrap(model).state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(model: torch.nn.Module, d: Dist, out: Path) -> None:
    """DDP keeps every rank's weights identical; a rank that drifted (a desync bug) would make the saved model one
    rank's view only. Every rank's weight digest goes into RUN/ddp.json, and a mismatch stops the run."""
    digests: list[str | None] = [None] * d.world
    dist.all_gather_object(digests, weights_digest(model))
    if d.main:
        save_json({"world": d.world, "ranks_agree": len(set(digests)) == 1, "weights_sha256": digests},
                  out / "ddp.json")
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
