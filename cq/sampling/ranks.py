"""`process_group`: the ranks of a ``torchrun`` launch (`torch.distributed`), or one process otherwise.

``torchrun --nproc-per-node K -m cq sample ...`` starts K processes with ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` in their environment; each joins one process group (gloo on CPU, nccl on CUDA)
and takes its share of the work. A plain launch (no ``WORLD_SIZE``, or 1) joins nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..errors import ConfigError, CqError


__all__ = ["Ranks", "process_group"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: ``items[rank], items[rank + world_size], ...``."""
        return list(items[self.rank :: self.world_size])

    def device(self, device: torch.device) -> torch.device:
        """The device this rank runs on: ``cuda`` without an index means ``cuda:LOCAL_RANK``."""
        if device.type == "cuda" and device.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def rank_zero_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 while the others wait, and return its result on every rank (broadcast); a `CqError`
        it raises is raised on every rank (the others get its message), so no rank runs on past a refusal."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except CqError as e:
                error = e
        if self.distributed:
            import torch.distributed as dist

            box = [(result, None if error is None else (type(error), str(error)))]
            dist.broadcast_object_list(box, src=0)
            result, remote = box[0]
            if remote is not None and error is None:
                kind, message = remote
                try:
                    error = kind(message)
                except TypeError:  # an error class with its own constructor
                    error = ConfigError(message)
        if error is not None:
            raise error
        return result

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer (set by torchrun)") from None


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join the ``torchrun`` process group for the length of the block (gloo for CPU work, nccl for CUDA) and
    yield this process's `Ranks`; without ``WORLD_SIZE > 1`` in the environment, yield one rank and join
    nothing. The group is destroyed on exit, also on an error."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield Ranks()
        return
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world}); launch with torchrun")
    import torch.distributed as dist

    ranks = Ranks(rank, world, local)
    if device.type == "cuda":
        torch.cuda.set_device(ranks.device(device))
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (ValueError, RuntimeError) as e:
        raise ConfigError(
            f"WORLD_SIZE={world} but the process group cannot start ({str(e).splitlines()[0]}); launch with "
            "torchrun --nproc-per-node K -m cq ..., which sets MASTER_ADDR / MASTER_PORT"
        ) from None
    try:
        yield ranks
    finally:
        dist.destroy_process_group()
