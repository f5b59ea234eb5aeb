"""The processes of a scan or an embedding run: rank, world size and barrier from accelerate, and
the rule that shard ``k`` belongs to process ``k % world`` (so merged results do not depend on it)."""

from __future__ import annotations

from collections.abc import Iterable


class Procs:
    """Rank, world size and barrier from accelerate (single process when not launched)."""

    def __init__(self):
        import torch
        from accelerate import PartialState

        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index
        self.world = self.state.num_processes
        self.device = self.state.device
        self.main = self.state.is_main_process

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def mine(self, n_shards: int) -> list[int]:
        return [k for k in range(n_shards) if k % self.world == self.rank]


def progress_bar(iterable: Iterable, total: int, desc: str, enabled: bool, unit: str = "shard"):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled)
