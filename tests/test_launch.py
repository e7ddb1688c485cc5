"""torchrun / Slurm environments are read consistently; bad ones fail with the variables named."""
import os
import stat

import pytest

from pretrain.launch import SLURM_PORT_BASE, LaunchError, read_env


def test_torchrun():
    e = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.source) == (3, 4, 1, "h0", 1234, "torchrun")


def test_single_process_defaults():
    e = read_env({})
    assert (e.rank, e.world_size, e.source) == (0, 1, "single")


def test_slurm_derives_master_and_port(tmp_path, monkeypatch):
    # A real executable named scontrol on PATH, answering `show hostnames` the way Slurm does.
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'node03\\nnode04\\nnode09\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    e = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                  "SLURM_JOB_NODELIST": "node[03-04,09]", "SLURM_JOB_ID": "424242"})
    assert (e.rank, e.world_size, e.local_rank, e.source) == (5, 8, 1, "slurm")
    assert e.master_addr == "node03"
    assert e.master_port == SLURM_PORT_BASE + 424242 % 20000


def test_slurm_single_node_name_needs_no_scontrol():
    e = read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                  "SLURM_JOB_NODELIST": "gpu7", "SLURM_JOB_ID": "1"})
    assert e.master_addr == "gpu7"


def test_torchrun_wins_over_slurm():
    e = read_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "5",
                  "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"})
    assert e.source == "torchrun" and e.rank == 1


@pytest.mark.parametrize("env,msg", [
    ({"RANK": "0"}, "RANK and WORLD_SIZE"),
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "outside the world"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "3"}, "SLURM_JOB_NODELIST"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"}, "SLURM_JOB_ID"),
])
def test_inconsistent_environment_is_named(env, msg):
    with pytest.raises(LaunchError, match=msg):
        read_env(env)
