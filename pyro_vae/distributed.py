"""Training across processes with torch.distributed, launched by ``torchrun``.

``torchrun --nproc-per-node N -m pyro_vae train ...`` starts N copies of the command;
torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address, and
:func:`from_environment` joins the process group (``nccl`` on CUDA, ``gloo`` on the CPU).
Nothing here launches processes or speaks a protocol of its own.

The training loop (:mod:`pyro_vae.train`) then:

* gives each rank a contiguous shard of every step's minibatch of B images; the model's
  ``"data"`` plate is still told the training set's size N, so each rank's loss is the
  usual estimate ``N / b_r * sum`` over its ``b_r`` images;
* weights rank r's gradient by ``b_r / B`` and sums them over ranks
  (:meth:`Group.all_reduce_`), one flat all-reduce per step that also carries the loss:
  the sum is exactly the gradient of ``N / B * sum`` over all B images, the gradient a
  single process computes on the whole minibatch. Every rank then takes the same Adam step
  from the same state, so the ranks' parameters stay identical (they start from rank 0's);
* checks for NaN or infinite values after the all-reduce: a bad value on any rank
  poisons the sum on every rank, so all stop at the same step with the same error;
* draws each rank's noise from its own stream, and saves every rank's stream in the checkpoint;
* writes metrics, progress and checkpoints from rank 0 alone.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import rng

TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer than this raises


class PeerFailure(RuntimeError):
    """Another process of a distributed run stopped (or stopped answering)."""


@dataclass(frozen=True)
class Group:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def leader(self) -> bool:
        """Rank 0: the process that writes the run's files and prints."""
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous part of a minibatch's indices, and its weight ``b_r / B``."""
        part = torch.tensor_split(idx, self.world_size)[self.rank]
        return part, part.numel() / max(idx.numel(), 1)

    def all_reduce_(self, grads: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """Sum ``grads`` (in place) and ``loss`` over the ranks in one flat all-reduce; returns the summed loss."""
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
        _collective(dist.all_reduce, flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1]

    def any(self, flag: bool, device) -> bool:
        """True on every rank when ``flag`` is true on any rank (one small all-reduce)."""
        return self.agree([flag], device)[0]

    def agree(self, flags: list[bool], device) -> list[bool]:
        """Each flag true on every rank when it is true on any rank (one small all-reduce for all)."""
        t = torch.tensor([int(bool(f)) for f in flags], device=device)
        _collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather_cat(self, part: torch.Tensor) -> torch.Tensor:
        """The ranks' 1-D tensors, concatenated in rank order, on every rank."""
        sizes = [None] * self.world_size
        _collective(dist.all_gather_object, sizes, int(part.numel()))
        padded = torch.zeros(max(sizes), dtype=part.dtype, device=part.device)
        padded[: part.numel()] = part
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        _collective(dist.all_gather, gathered, padded)
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)])

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Every rank takes rank 0's parameters and buffers."""
        for tensor in list(module.parameters()) + list(module.buffers()):
            with torch.no_grad():
                _collective(dist.broadcast, tensor.data, src=0)

    def gather_rng_states(self) -> list[dict]:
        """Every rank's RNG state, in rank order (on every rank)."""
        states = [None] * self.world_size
        _collective(dist.all_gather_object, states, rng.get_state())
        return states


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as err:
        raise PeerFailure(f"a collective operation of the distributed run failed ({_cause(err)}): "
                          "another process stopped or stopped answering; its own error says why") from err


def _cause(err: BaseException) -> str:
    """The backend's error in a few words: its first line, without gloo's source location
    and its advice to read the other worker's logs (which the message gives anyway)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"\[[^\]\s]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically caused")[0].rstrip(". ")


def environment_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def from_environment(device: torch.device) -> Group | None:
    """Join (or find) the process group torchrun describes; None for a single process.

    On CUDA each process takes the GPU of its ``LOCAL_RANK`` and the ``nccl`` backend;
    on the CPU, ``gloo``.
    """
    if environment_world_size() <= 1 and not dist.is_initialized():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        try:
            _init_process_group(backend)
        except (RuntimeError, dist.DistError) as err:
            raise PeerFailure(f"could not join the other processes of the distributed run ({_cause(err)}): "
                              "another process stopped before they met; its own error says why") from None
        atexit.register(_leave)
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def _init_process_group(backend: str) -> None:
    """``init_process_group`` from torchrun's environment, each restart in a store space of its own.

    torchrun's workers share the agent's store (``TORCHELASTIC_USE_AGENT_STORE``) at the
    same address on every restart, and the process group's keys are not told the attempt:
    a restarted gloo rank then reads the dead group's addresses and cannot connect
    ("Gloo connectFullMesh failed ... Connection refused"; seen with torch 2.14, as in
    pytorch/pytorch#167288 for NCCL). Prefixing the store with the restart count gives
    each attempt fresh keys; elsewhere the environment is used as it is."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
        return
    world_size = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=TIMEOUT)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"pyro_vae/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=world_size, timeout=TIMEOUT)


def _leave() -> None:
    """Tear the process group down before the interpreter does: left to exit, gloo's
    threads can be destroyed while still joinable, and a rank that has done all of its
    work then aborts ("terminate called without an active exception")."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; a dead peer's error was reported already
            pass


def device_for(group: Group | None, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when training on CUDA, else ``device``."""
    if group is not None and device.type == "cuda":
        return torch.device("cuda", group.local_rank)
    return device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s noise stream in a run seeded ``seed``."""
    return (int(seed) * 1_000_003 + 7919 * (rank + 1)) % (2**32 - 1)  # numpy takes seeds below 2^32
