"""Every launcher's environment maps to one Topology (the only place that reads RANK or SLURM_*)."""
from nlip_ds.distributed import resolve_topology


def test_single_process():
    t = resolve_topology({})
    assert (t.rank, t.local_rank, t.world_size, t.launcher) == (0, 0, 1, "single")


def test_deepspeed_and_torchrun():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    t = resolve_topology(env)
    assert (t.rank, t.local_rank, t.world_size, t.master_addr, t.master_port) == (3, 1, 4, "10.0.0.1", 1234)
    assert t.launcher == "deepspeed"
    assert resolve_topology({**env, "TORCHELASTIC_RUN_ID": "x"}).launcher == "torchrun"


def test_slurm_srun_maps_procid_localid_ntasks():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "MASTER_ADDR": "node1",
           "MASTER_PORT": "29999"}
    t = resolve_topology(env)
    assert (t.rank, t.local_rank, t.world_size, t.master_addr, t.master_port, t.launcher) == \
        (5, 1, 8, "node1", 29999, "slurm")


def test_launcher_variables_win_over_slurm():
    # deepspeed --no_ssh inside an srun task: the launcher's RANK is the truth, not SLURM_PROCID.
    env = {"RANK": "2", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert resolve_topology(env).rank == 2
