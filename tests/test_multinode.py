"""Several machines, tested on one: a job of 2 "nodes" with one process each, started as a multi-node launch starts
it (the shipped conf/accelerate/multinode.yaml with accelerate's machine arguments: distinct machine ranks, the
first one's rendezvous on localhost; tests/launching.py captures what that gives each rank and forks the ranks),
ends with the weights and optimizer moments of one process with the global batch. scripts/slurm/train.sbatch fills
in the same arguments from Slurm."""

from conftest import tiny_train_overrides
from methods import learning_rate
from test_fsdp import ROOT, assert_same_training_state, train_here
from test_multiprocess import make_text_cache, scale_out_command

import launching

MULTINODE = ROOT / "pixsig_distill" / "conf" / "accelerate" / "multinode.yaml"


def test_two_nodes_of_one_process_end_with_the_one_process_weights(tiny_folder, compose_train, tmp_path):
    ranks = launching.rank_environments(MULTINODE, nodes=2)
    assert [(r["RANK"], r["GROUP_RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in ranks] == [
        ("0", "0", "0", "2"), ("1", "1", "0", "2")]  # two machines, each its own rank 0 locally
    assert {r["MASTER_ADDR"] for r in ranks} == {"127.0.0.1"}

    command = scale_out_command(lambda out: tiny_train_overrides(tiny_folder, out),
                                make_text_cache(tiny_folder, tmp_path / "cache"), tmp_path)
    reference = tmp_path / "one_process"
    train_here(command(reference, "train.batch_size=4"))  # the global batch of 4 at once
    out = tmp_path / "two_nodes"
    job = launching.launch(command(out), tmp_path, MULTINODE, nodes=2)  # 2 nodes × 1 process × batch 2
    assert job.returncode == 0, job.log[-4000:]
    assert "2 process(es)" in job.log

    assert_same_training_state(out, reference, 4, learning_rate(compose_train()))


def test_the_slurm_script_gives_each_node_its_machine_rank_and_the_first_nodes_rendezvous(tmp_path):
    """scripts/slurm/train.sbatch under stand-ins of srun (one task per node, SLURM_NODEID set), scontrol and
    accelerate (which records its arguments): each node's launch parses as accelerate's own launcher reads it."""
    import os
    import stat
    import subprocess

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    stubs = tmp_path / "bin"
    stubs.mkdir()
    scripts = {"scontrol": 'printf "node-a\\nnode-b\\n"',
               "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
                       'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@"; done',
               "accelerate": 'printf "%s\\n" "$@" > "$ARGS_DIR/node-$SLURM_NODEID"'}
    for name, body in scripts.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod((stubs / name).stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "ARGS_DIR": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), "t_bar=400", "seed=3"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for node in (0, 1):
        argv = (tmp_path / f"node-{node}").read_text().splitlines()
        assert argv[0] == "launch"
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[1:]))
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, node)
        assert (args.main_process_ip, args.main_process_port) == ("node-a", 29500)
        assert args.module and args.training_script == "pixsig_distill.train"
        assert args.training_script_args == ["t_bar=400", "seed=3"]
