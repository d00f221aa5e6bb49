"""Process-group environment for the training scripts, whichever way they were started.

The `deepspeed` launcher (and torchrun) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for every
process. `mpirun -np N python train_deepspeed.py` sets only MPI's own variables: there the ranks, the local rank
(ranks sharing a node) and rank 0's address and a free port are learned through mpi4py and written into the same
variables, so that DeepSpeed, the Trainer and torch.distributed start as under the launcher.
"""
import gc
import os
import socket
import sys

MPI_ENV_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def free_port():
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def set_env_from_mpi():
    """Under mpirun (MPI's variables, no launcher's RANK), fill the torch.distributed variables from MPI (mpi4py)."""
    if "RANK" in os.environ or not any(name in os.environ for name in MPI_ENV_MARKERS):
        return
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise SystemExit(
            "started by mpirun, but mpi4py is missing: pip install mpi4py (with an MPI library installed, e.g. "
            "apt-get install openmpi-bin libopenmpi-dev)"
        ) from error
    world = MPI.COMM_WORLD
    local_rank = world.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    # Rank 0's address as the other nodes reach it, and a port that is free there.
    master = world.bcast((socket.gethostbyname(socket.gethostname()), free_port()) if world.Get_rank() == 0 else None, root=0)
    os.environ.update(
        RANK=str(world.Get_rank()),
        WORLD_SIZE=str(world.Get_size()),
        LOCAL_RANK=str(local_rank),
        MASTER_ADDR=os.environ.get("MASTER_ADDR", master[0]),
        MASTER_PORT=os.environ.get("MASTER_PORT", str(master[1])),
    )


def leave_process_group():
    """At the end of a run on several processes: every rank waits until rank 0 has saved, then leaves the process
    group. A rank that exits while another still works tears its communication threads down under it ("terminate
    called without an active exception"), and the launcher then kills the whole job. So does a group that outlives
    main: its threads would still run during the interpreter's shutdown, where one that releases a Python object
    aborts the process. What the run left in reference cycles (its model, whose parameters hold DeepSpeed's groups)
    goes first; DeepSpeed keeps its own references to the groups it made (ZeRO-3's among them), which only its
    destroy_process_group releases. (ZeRO-3 also keeps the model in DeepSpeed's module-level state: its groups stay.)"""
    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        deepspeed_comm = sys.modules.get("deepspeed.comm")
        if deepspeed_comm is not None and deepspeed_comm.is_initialized():
            deepspeed_comm.destroy_process_group()  # torch's, then DeepSpeed's own references
        else:
            dist.destroy_process_group()
        gc.collect()
