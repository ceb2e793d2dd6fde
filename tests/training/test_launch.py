"""The launchers for real: launch/train_slurm.sbatch on a one-machine SLURM cluster (`slurm`), and
launch/train_torchrun.sh as two node agents on the loopback address (`multinode`).

Losses are read from the runs' TensorBoard files and compared with a single-process run of the same
config (fp32, no clipping, no dropout). The SLURM cluster is started by tests/cluster/start_slurm.sh
(root; installs Debian's packages when missing); without it the slurm tests skip, except under CI
(CI=true), where they fail.
"""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from train_testlib import BASE, DEMO, PYTHON, ROOT, env, free_port, run, set_args, torchrun_launcher, train_cmd

TOL = 1e-5  # fp32 losses (~5.5) of the same computation: summation order only; TensorBoard stores fp32
SBATCH = str(ROOT / "launch/train_slurm.sbatch")
TORCHRUN_SH = str(ROOT / "launch/train_torchrun.sh")


def tb_losses(tensorboard_dir) -> dict[int, float]:
    """{iteration: lm loss} from every event file in the directory (a resumed run appends a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("lm loss")}


def sets(extra=()):
    return set_args([*BASE, *extra])


@pytest.mark.parametrize(
    "world, sets_, error",
    [
        (2, ["parallel.tensor_parallel=2"], None),
        (
            3,
            ["parallel.tensor_parallel=2"],
            "error: SLURM_NTASKS=3: world size 3 is not divisible by tensor_parallel x pipeline_parallel = 2",
        ),
        (
            3,
            [],
            "error: SLURM_NTASKS=3: parallel.global_batch_size=8 is not divisible by micro_batch_size x "
            "data_parallel = 2 x 3",
        ),
    ],
)
def test_launch_check_names_the_task_count_and_the_layout(world, sets_, error):
    """The check the sbatch script runs before starting any rank (demo-tiny: global batch 8, micro 2)."""
    check = [PYTHON, "-m", "megatron_outeff.training.launch_checks", "--world-size", str(world)]
    r = run(
        [*check, "--world-from", f"SLURM_NTASKS={world}", "--config", DEMO, *set_args(sets_), "--resume"], timeout=120
    )
    assert (r.returncode, r.stdout, r.stderr.strip() or None) == ((2 if error else 0), "", error)


def _trainer(extra_env, sets_):
    return run(train_cmd([*BASE, *sets_]), timeout=300, **extra_env)


def test_a_stale_world_size_does_not_break_a_one_process_run(tmp_path):
    """Issue 19 item 12: WORLD_SIZE left in the environment without a launcher (no RANK) is not the world:
    process-group initialisation makes a single-process group there, and the layout check agrees."""
    r = _trainer({"WORLD_SIZE": "3"}, ["train.train_iters=1"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "world 1 = TP 1 x PP 1 x DP 1" in r.stdout


def test_the_launchers_world_size_is_named_in_a_layout_error(tmp_path):
    """With a launcher's RANK, WORLD_SIZE is the world: a layout it does not fit is one line naming the variable,
    before any rendezvous (nothing waits for the two ranks that will never come)."""
    r = _trainer(
        {
            "RANK": "0",
            "WORLD_SIZE": "3",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        },
        [f"checkpoint.dir={tmp_path / 'ck'}"],
    )
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and errors == [
        "error: WORLD_SIZE=3: parallel.global_batch_size=4 is not divisible by micro_batch_size x data_parallel = 1 x 3"
    ], r.stderr[-2000:]
    r = _trainer({"RANK": "0", "WORLD_SIZE": "two", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}, [])
    assert r.returncode == 2 and "error: WORLD_SIZE='two'" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "ck").exists()


# --------------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------------
def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster():
    r = subprocess.run(
        ["bash", str(ROOT / "tests/cluster/start_slurm.sh")], capture_output=True, text=True, timeout=900
    )
    if r.returncode != 0:
        lines = (r.stderr or r.stdout or "no output").strip().splitlines()
        reason = f"no SLURM cluster (tests/cluster/start_slurm.sh exit {r.returncode}): {lines[-1]}"
        if _under_ci():
            pytest.fail(reason)
        pytest.skip(reason)


def _sbatch(tmp_path, ntasks, extra_sets=(), sbatch_args=()) -> str:
    cmd = [
        "sbatch",
        "--parsable",
        f"--ntasks={ntasks}",
        f"--ntasks-per-node={ntasks}",
        "--nodes=1",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--time=15",
        f"--output={tmp_path}/job-%j.out",
        *sbatch_args,
        SBATCH,
        DEMO,
        *sets(extra_sets),
    ]
    r = run(cmd, timeout=60, PYTHON=PYTHON, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _job(job_id) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _wait_done(job_id, restarts=0, timeout=600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(job_id)
        if int(job["Restarts"]) == restarts and job["JobState"] in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
        ):
            return job
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} not finished after {timeout} s: {_job(job_id).get('JobState')}")


def _wait_for_line(path: Path, prefix: str, job_id, after: str = "", timeout=600) -> None:
    """Until the job's output has a line starting with prefix (after the text `after`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text() if path.exists() else ""
        tail = text if not after else text.split(after, 1)[1] if after in text else ""
        if any(line.startswith(prefix) for line in tail.splitlines()):
            return
        assert _job(job_id)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED"), path.read_text()[-3000:]
        time.sleep(0.05)
    pytest.fail(f"no line '{prefix}' in {path} after {timeout} s")


@pytest.mark.slurm
def test_sbatch_two_tasks_match_single_process(slurm_cluster, oracle, tmp_path):
    """sbatch, 2 tasks (DP=2, ZeRO-1): COMPLETED with exit 0, the single-process loss curve."""
    tb = tmp_path / "tb"
    job_id = _sbatch(tmp_path, 2, ["parallel.zero_stage=1", f"logging.tensorboard_dir={tb}"])
    job = _wait_done(job_id)
    out = (tmp_path / f"job-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), out[-3000:]
    assert "world 2 = TP 1 x PP 1 x DP 2" in out
    losses = tb_losses(tb)
    assert sorted(losses) == [1, 2, 3, 4]
    assert [losses[i] for i in (1, 2, 3, 4)] == pytest.approx(oracle["losses"], abs=TOL)


@pytest.mark.slurm
def test_preempted_job_saves_exits_0_and_requeued_job_resumes(slurm_cluster, tmp_path):
    """scancel --signal=TERM to the tasks mid-run: every rank saves and the job COMPLETES with exit 0;
    scontrol requeue runs the same batch script again, which resumes from the checkpoint. That run gets
    SIGUSR1 on its batch shell (what --signal=B:USR1@120 sends before the time limit): it saves and
    exits 0 too; requeued once more it finishes. The three parts give the uninterrupted
    run's curve in the same layout (DP=2 under torchrun: resuming must be exact; DP=2 against a single
    process differs by summation order, which 100 Adam steps amplify past a rounding bound - the
    two-task test covers that equality over a short run)."""
    iters = 100  # long enough that the signals land mid-run (steps take ~30-100 ms)
    extra = [f"train.train_iters={iters}"]
    ref_tb = tmp_path / "ref_tb"
    job_id = _sbatch(
        tmp_path,
        2,
        [*extra, f"checkpoint.dir={tmp_path / 'ck'}", f"logging.tensorboard_dir={tmp_path / 'tb'}"],
        ["--requeue"],
    )
    # the uninterrupted reference in the same layout (2 processes), while the job starts
    ref_cmd = train_cmd([*BASE, *extra, f"logging.tensorboard_dir={ref_tb}"], torchrun_launcher())
    ref = run(ref_cmd, timeout=600, OMP_NUM_THREADS="1")
    assert ref.returncode == 0, ref.stderr[-3000:]
    log = tmp_path / f"job-{job_id}.out"
    _wait_for_line(log, "iter 1 ", job_id)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True, timeout=30)
    job = _wait_done(job_id)
    out = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), out[-3000:]
    assert "stop requested" in out, out[-3000:]
    stopped_at = int(re.search(r"done at iteration (\d+) \(stopped early\)", out).group(1))
    assert 1 <= stopped_at < iters
    assert (tmp_path / "ck/latest").read_text().strip() == f"iter_{stopped_at:07d}"

    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    _wait_for_line(log, f"iter {stopped_at + 1} ", job_id, after="(restart 1)")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
    job = _wait_done(job_id, restarts=1)
    part2 = log.read_text().split("(restart 1)")[1]
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), part2[-3000:]
    assert f"resumed from {tmp_path / 'ck'}/iter_{stopped_at:07d} at iteration {stopped_at}" in part2, part2[-3000:]
    assert "time limit near" in part2 and "stop requested" in part2, part2[-3000:]
    stopped_again = int(re.search(r"done at iteration (\d+) \(stopped early\)", part2).group(1))
    assert stopped_at < stopped_again < iters

    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    job = _wait_done(job_id, restarts=2)
    part3 = log.read_text().split("(restart 2)")[1]
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), part3[-3000:]
    assert f"at iteration {stopped_again}" in part3 and f"done at iteration {iters}\n" in part3, part3[-3000:]
    assert (tmp_path / "ck/latest").read_text().strip() == f"iter_{iters:07d}"
    losses, expected = tb_losses(tmp_path / "tb"), tb_losses(ref_tb)
    assert sorted(losses) == list(range(1, iters + 1))
    assert [losses[i] for i in sorted(losses)] == pytest.approx([expected[i] for i in sorted(losses)], abs=TOL)


@pytest.mark.slurm
def test_task_count_that_does_not_fit_the_layout_is_one_line_and_writes_nothing(slurm_cluster, tmp_path):
    job_id = _sbatch(
        tmp_path,
        1,
        [
            "parallel.tensor_parallel=2",
            f"checkpoint.dir={tmp_path / 'ck'}",
            f"logging.tensorboard_dir={tmp_path / 'tb'}",
        ],
    )
    job = _wait_done(job_id)
    out = (tmp_path / f"job-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: SLURM_NTASKS=1: world size 1 is not divisible by tensor_parallel x pipeline_parallel = 2"
    ], out
    assert not (tmp_path / "ck").exists() and not (tmp_path / "tb").exists()


# --------------------------------------------------------------------------------------------------
# Two torchrun node agents on 127.0.0.1
# --------------------------------------------------------------------------------------------------
def _two_agents(tmp_path, sets_per_node, timeout=400):
    port = free_port()
    procs = []
    for node_rank, node_sets in enumerate(sets_per_node):
        e = dict(
            env(),
            NNODES="2",
            NODE_RANK=str(node_rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GPUS_PER_NODE="1",
            PYTHON=PYTHON,
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                ["bash", TORCHRUN_SH, DEMO, *sets(node_sets)],
                env=e,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outs


@pytest.mark.multinode
@pytest.mark.multiproc
def test_two_node_agents_match_single_process(oracle, tmp_path):
    """NNODES=2, started twice (NODE_RANK 0 and 1), one process each, c10d rendezvous on 127.0.0.1:
    one DP=2 ZeRO-1 job with the single-process curve."""
    tb = tmp_path / "tb"
    node_sets = ["parallel.zero_stage=1", f"logging.tensorboard_dir={tb}"]
    codes, outs = _two_agents(tmp_path, [node_sets, node_sets])
    assert codes == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert sum("world 2 = TP 1 x PP 1 x DP 2" in out for out in outs) == 1  # printed by global rank 0 only
    losses = tb_losses(tb)
    assert [losses[i] for i in sorted(losses)] == pytest.approx(oracle["losses"], abs=TOL)


@pytest.mark.multinode
@pytest.mark.multiproc
def test_node_agents_with_different_configs_stop_with_one_error(tmp_path):
    """Agents given different configs: the trainers stop before building anything, with one line naming
    the first differing key and both values; nothing is written."""
    node0 = ["parallel.zero_stage=1", f"checkpoint.dir={tmp_path / 'ck'}"]
    codes, outs = _two_agents(tmp_path, [node0, [*node0, "optimizer.lr=0.002"]])
    assert codes[0] != 0 and codes[1] != 0, outs
    errors = [line for out in outs for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: config differs between ranks (node agents started with different configs?): "
        "optimizer.lr is 0.001 on rank 0 but 0.002 on rank 1"
    ], outs[0][-3000:] + outs[1][-3000:]
    assert not (tmp_path / "ck").exists()
