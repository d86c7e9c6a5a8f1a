"""Sessions on Keras' torch backend: one device per process (a GPU by local rank, else the
CPU); across processes, ``torch.distributed`` (Gloo on CPUs, NCCL on GPUs), its process group
started at rank 0's address from ktrain's own rendezvous, so no torchrun is needed.

Gradients are averaged where Keras applies an update (``ktrain.optimizers.averaging``, as on
TensorFlow): each dtype's gradients travel fused in one allreduce, and the stop flags ride in
the same message, so every rank learns them after the same step at no extra cost. Keras' torch
layers make dense gradients (an Embedding's too), so an average is what one process computes.
"""

from __future__ import annotations

import atexit
import datetime

import numpy as np

from ktrain.errors import UserError, WorkersFailed
from ktrain.session import Session
from ktrain.supervisor import is_supervised


def local_device(local_rank: int = 0) -> str:
    """This process' device, as Keras' torch backend places tensors on it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def process_session(rank: int, local_rank: int, peers: list[str],
                    start_timeout: float) -> Session:
    """Join the other processes (at rank 0's address in ``peers``) in one process group."""
    import torch
    import torch.distributed as dist

    device = local_device(local_rank)
    try:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                init_method=f"tcp://{peers[0]}", rank=rank,
                                world_size=len(peers),
                                timeout=datetime.timedelta(seconds=max(1.0, start_timeout)))
    except (RuntimeError, ValueError) as err:  # torch reports a missing peer as either
        raise WorkersFailed(f"rank {rank} could not join the other {len(peers) - 1} torch "
                            f"process(es) at {peers[0]}: {str(err).splitlines()[0]}",
                            hint="see the other ranks' logs; strategy.start_timeout allows "
                                 "slower starts") from None
    # Gloo's threads must be joined before the interpreter tears down, or the process aborts
    # at exit ("terminate called without an active exception") after a finished run.
    atexit.register(dist.destroy_process_group)
    processes = TorchProcesses(rank, len(peers), torch.device(device))
    return Session(rank=rank, world_size=len(peers), num_replicas=len(peers), devices=(device,),
                   communicator=processes, log_to_file=not is_supervised())


class TorchProcesses:
    """The processes of one ``torch.distributed`` group, as ktrain's communicator."""

    name = "torch.distributed"
    reduces_gradients = True
    """ktrain averages the gradients (``average_updates``)."""

    def __init__(self, rank: int, world_size: int, device):
        import torch.distributed as dist

        self.rank, self.world_size, self.device = rank, world_size, device
        self._dist = dist

    def sum_host(self, values) -> np.ndarray:
        """``values`` added up over the processes, as float64, outside any train step."""
        import torch

        total = torch.as_tensor(np.asarray(values, np.float64), device=self.device)
        self._dist.all_reduce(total)
        return total.cpu().numpy()

    def barrier(self) -> None:
        self.sum_host(np.zeros(1))

    def flags(self, count: int) -> TorchFlags:
        return TorchFlags(count)

    def average_updates(self, model, flags: TorchFlags | None = None, *,
                        compression: str = "none", bucket_bytes: int | None = None) -> None:
        """Every optimizer ``model`` updates with averages its gradients, and ``flags``, over
        the processes. (``compression`` is refused before a run starts; gradients travel in one
        message per dtype whatever ``bucket_bytes`` says: the sums are the same.)"""
        from ktrain.optimizers import averaging, optimizers_of  # imports Keras: ranks only

        synchronized = [layer.name for layer in model._flatten_layers(include_self=False)
                        if getattr(layer, "synchronized", False)]
        if synchronized:
            raise UserError(f"BatchNormalization layer(s) {', '.join(synchronized)} are "
                            f"synchronized=True, which ktrain carries over processes on "
                            f"TensorFlow only", where="model.fn",
                            hint="use backend: tensorflow, or synchronized=False (each worker's "
                                 "statistics of its share of the batch)")
        for optimizer in optimizers_of(model).values():
            averaging(optimizer, lambda grads: self._average(grads, flags))

    def plain_updates(self, model) -> None:
        from ktrain.optimizers import optimizers_of, plain

        for optimizer in optimizers_of(model).values():
            plain(optimizer)

    def copy_from_chief(self, variables) -> None:
        import torch

        with torch.no_grad():
            for variable in variables:
                value = variable.value.detach().clone()
                self._dist.broadcast(value, src=0)
                variable.assign(value)

    def _average(self, grads: list, flags: TorchFlags | None) -> list:
        """``grads`` averaged over the processes, one fused allreduce per dtype; the flags
        travel with the first."""
        import torch

        with torch.no_grad():
            if flags is not None:
                flags.arrivals += 1
            by_dtype: dict = {}
            for i, grad in enumerate(grads):
                by_dtype.setdefault(grad.dtype, []).append(i)
            averaged = list(grads)
            riders = flags is not None
            for dtype, indices in by_dtype.items():
                parts = [grads[i].reshape(-1) for i in indices]
                if riders:
                    parts.append(flags.raised.to(device=grads[indices[0]].device, dtype=dtype))
                flat = torch.cat(parts)
                self._dist.all_reduce(flat)
                flat /= self.world_size
                if riders:
                    flags.agreed_values = flat[-len(flags.raised):].cpu()
                    riders = False
                offset = 0
                for i in indices:
                    size = grads[i].numel()
                    averaged[i] = flat[offset:offset + size].view_as(grads[i])
                    offset += size
            return averaged


class TorchFlags:
    """Flags any rank raises (a stop signal arrived, room to grow) that every rank learns
    after the same step: their mean travels in the step's gradient allreduce."""

    def __init__(self, count: int):
        import torch

        self.raised = torch.zeros(count)
        self.agreed_values = torch.zeros(count)
        self.arrivals = 0
        """Gradient allreduces this rank has arrived at (see ktrain.watchdog)."""

    def raise_flag(self, index: int = 0) -> None:
        self.raised[index] = 1.0

    def agreed(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.agreed_values.numpy() > 0)]

    def arrived(self) -> int:
        return self.arrivals
