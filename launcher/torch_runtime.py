"""Sessions on Keras' torch backend: one device per process (a GPU by local rank, else the
CPU); across processes, ``torch.distributed`` (Gloo on CPUs, NCCL on GPUs), its process group
started at rank 0's address from ktrain's own rendezvous: no torchrun is needed, and under
torchrun its variables place the ranks as any scheduler's do (``ktrain.environment``).

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
    host, _, port = peers[0].rpartition(":")
    timeout = datetime.timedelta(seconds=max(1.0, start_timeout))
    try:
        # A store of our own: under torchrun, init_method="tcp://" would join torchrun's
        # store instead (TORCHELASTIC_USE_AGENT_STORE), where rank 0 is not listening.
        store = dist.TCPStore(host, int(port), len(peers), is_master=rank == 0,
                              timeout=timeout)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store,
                                rank=rank, world_size=len(peers), timeout=timeout)
    except (RuntimeError, ValueError) as err:  # torch reports a missing peer as either
        raise WorkersFailed.could_not_join(rank, peers, "torch.distributed", err) from None
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
            values, _ = _fused([v.value.detach() for v in variables],
                               lambda flat: self._dist.broadcast(flat, src=0))
            for variable, value in zip(variables, values):
                variable.assign(value)

    def _average(self, grads: list, flags: TorchFlags | None) -> list:
        """``grads`` averaged over the processes, one fused allreduce per dtype; the flags
        travel with the first."""
        import torch

        def mean(flat):
            self._dist.all_reduce(flat)
            flat /= self.world_size

        with torch.no_grad():
            if flags is None:
                return _fused(grads, mean)[0]
            flags.arrivals += 1
            averaged, agreed = _fused(grads, mean, rider=flags.raised)
            if agreed is not None:
                flags.agreed_values = agreed
            return averaged


def _fused(tensors: list, collective, rider=None) -> tuple[list, object]:
    """``tensors`` through ``collective`` (in place, on one flat tensor per dtype: one message
    each); ``rider``, a 1-D tensor, travels at the end of the first. Returns the tensors and
    the rider as they came out (None if nothing travelled)."""
    import torch

    by_dtype: dict = {}
    for i, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(i)
    out, rider_out = list(tensors), None
    for dtype, indices in by_dtype.items():
        parts = [tensors[i].reshape(-1) for i in indices]
        if rider is not None:
            parts.append(rider.to(device=tensors[indices[0]].device, dtype=dtype))
        flat = torch.cat(parts)
        collective(flat)
        if rider is not None:
            rider_out, rider = flat[-len(rider):].cpu(), None
        offset = 0
        for i in indices:
            size = tensors[i].numel()
            out[i] = flat[offset:offset + size].view_as(tensors[i])
            offset += size
    return out, rider_out


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
