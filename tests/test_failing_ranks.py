"""Every rank leaves together: ranks whose data ends first, that fail or that are killed.

Each case is ``failing_ranks_script.py`` on 2 real gloo processes: under one
``torch.distributed.run`` agent, under two agents as two simulated nodes (where no agent can
end the other's rank), or as two bare processes (no agent at all). Every launch has a
timeout that kills its processes, so a hang fails the test instead of blocking CI; every
case must also end within 30 s of its fault.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Dict, List

import pytest
import torch
from conftest import run_launch

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "failing_ranks_script.py")
TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(out, mode: str) -> List[Dict]:
    return [torch.load(out / f"{mode}-rank{r}.pt", weights_only=False) for r in (0, 1)]


def _torchrun(out, mode: str) -> List[Dict]:
    run_launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               SCRIPT, str(out), mode, timeout=TIMEOUT)
    return _results(out, mode)


def _torchrun_exit_code(out, mode: str) -> int:
    """Launch like ``_torchrun``; return the launcher's exit code, whatever it is."""
    codes, _ = _processes([[sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", SCRIPT, str(out), mode]], [_clean_env()])
    return codes[0]


def _processes(commands: List[List[str]], envs: List[Dict[str, str]]) -> List[int]:
    """Start every command in a session of its own; kill them all if one hangs."""
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for command, env in zip(commands, envs)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail("a launch hung:\n" + "\n".join(p.communicate()[0][-2000:] for p in procs))
    return [proc.returncode for proc in procs], outputs


def _clean_env() -> Dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _two_nodes(out, mode: str) -> List[Dict]:
    """Two ``torch.distributed.run`` agents, one rank each, meeting on localhost."""
    port = str(_free_port())
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                 f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                 f"--master_port={port}", SCRIPT, str(out), mode] for node in (0, 1)]
    codes, outputs = _processes(commands, [_clean_env(), _clean_env()])
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return _results(out, mode)


def _ended_together(results: List[Dict]) -> None:
    for rank in results:
        assert rank["barrier"] is True  # the script's own collective after the session
        assert rank["seconds"] < 30


# -- a rank whose data ends first ---------------------------------------------------------


@pytest.mark.parametrize("launch", [_torchrun, _two_nodes], ids=["torchrun", "two_nodes"])
def test_a_rank_whose_data_ends_first_stops_the_others_one_run_later(tmp_path, launch):
    rank0, rank1 = launch(tmp_path, "uneven")
    _ended_together([rank0, rank1])
    assert rank0["error"] is None and rank1["error"] is None  # an uneven end is no error
    assert rank0["global_step"] == 3  # its data ended
    # rank 0's message is in its next vote, read by rank 1 at the end of its run 5
    assert rank1["global_step"] == 5
    assert rank1["warnings"] == [
        "lightning_finalops: rank 0 ended its session (its data ran out, a stop of its own, "
        "a break or close()); MonitoredSession stops on this rank after global step 5."
    ]
    assert rank0["warnings"] == []


def test_a_rank_that_exits_with_its_session_open_tells_the_others(tmp_path):
    rank0, rank1 = _torchrun(tmp_path, "exit_open")
    assert rank0["global_step"] == 3 and rank1["global_step"] == 5
    assert rank1["error"] is None and rank1["seconds"] < 30
    assert rank1["warnings"] == [
        "lightning_finalops: rank 0 exited without closing its session; MonitoredSession "
        "stops on this rank after global step 5."
    ]


def test_a_session_whose_hooks_declare_nothing_lets_each_rank_end_on_its_own(tmp_path):
    rank0, rank1 = _torchrun(tmp_path, "uneven_final_ops")
    _ended_together([rank0, rank1])  # no collective of the library's to wait in
    assert (rank0["global_step"], rank1["global_step"]) == (3, 6)
    assert rank0["warnings"] == rank1["warnings"] == []


# -- a rank that fails --------------------------------------------------------------------


@pytest.mark.parametrize("launch", [_torchrun, _two_nodes], ids=["torchrun", "two_nodes"])
def test_an_exception_on_one_rank_ends_every_rank_with_an_error_naming_it(tmp_path, launch):
    rank0, rank1 = launch(tmp_path, "raise")
    _ended_together([rank0, rank1])
    assert rank1["error"] == ("ValueError", "boom on rank 1")  # its own exception, as raised
    assert rank1["global_step"] == 3
    kind, text = rank0["error"]
    assert kind == "RankFailedError"
    assert text.startswith("lightning_finalops: rank 1 failed with ValueError: boom on rank 1.")
    assert rank0["global_step"] == 4  # the run that read rank 1's vote


def test_a_nan_on_one_rank_fails_every_rank_at_the_same_step(tmp_path):
    rank0, rank1 = _torchrun(tmp_path, "nan_fail")
    _ended_together([rank0, rank1])
    for rank in (rank0, rank1):
        assert rank["error"] == ("NanLossDuringTrainingError", "NaN loss during training.")
        assert rank["global_step"] == 4
    assert "NaN loss on this rank at global step 3" in rank1["warnings"][0]


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    rank0, rank1 = _torchrun(tmp_path, "nan_stop")
    _ended_together([rank0, rank1])
    assert rank0["error"] is None and rank1["error"] is None
    assert rank0["global_step"] == rank1["global_step"] == 4


# -- a rank that is killed ----------------------------------------------------------------


def test_a_killed_rank_ends_the_others_within_the_agreement_timeout_naming_it(tmp_path):
    # bare processes: no torchrun agent that would end rank 0 itself
    port = str(_free_port())
    envs = [dict(_clean_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in (0, 1)]
    codes, outputs = _processes([[sys.executable, SCRIPT, str(tmp_path), "kill"]] * 2, envs)
    assert codes == [0, -signal.SIGKILL], outputs[0][-3000:]
    rank0 = torch.load(tmp_path / "kill-rank0.pt", weights_only=False)
    kind, text = rank0["error"]
    assert kind == "AgreementTimeoutError"
    assert text.startswith("lightning_finalops: MonitoredSession on rank 0, at global step 4: "
                           "rank(s) [1] did not answer")
    assert "agreement_timeout=20" in text
    assert rank0["seconds"] < 30


# -- hooks of the chief alone -------------------------------------------------------------


def test_an_early_stopping_hook_of_the_chief_alone_stops_every_rank_at_one_step(tmp_path):
    rank0, rank1 = _torchrun(tmp_path, "chief_early_stop")
    _ended_together([rank0, rank1])
    assert rank0["error"] is None and rank1["error"] is None
    assert rank0["stopped"] is True  # the chief's hook decided at step 3 ...
    assert rank0["global_step"] == rank1["global_step"] == 4  # ... every rank stopped at 4


# -- a rank that is preempted -------------------------------------------------------------


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sigterm")
    codes = {mode: _torchrun_exit_code(out, mode)
             for mode in ("sigterm_first", "sigterm_resume", "sigterm_straight")}
    return out, codes, {mode: _results(out, mode) for mode in codes}


def test_sigterm_on_one_rank_stops_every_rank_at_one_step_and_saves_it(preempted):
    out, codes, results = preempted
    rank0, rank1 = results["sigterm_first"]
    assert rank0["global_step"] == rank1["global_step"] == 6  # sent at 5, agreed at 6
    assert "model.ckpt-6" in os.listdir(out / "ckpt")  # (the relaunch wrote model.ckpt-10)
    assert torch.load(out / "ckpt" / "model.ckpt-6", weights_only=False)["global_step"] == 6
    # rank 1 then exits as the signal asked (the launcher reports it); rank 0 ends cleanly
    assert codes["sigterm_first"] != 0 and "w" in rank0 and "w" not in rank1
    assert rank0["warnings"] == ["lightning_finalops: another rank received SIGTERM: "
                                 "MonitoredSession stops on this rank after global step 6."]


def test_a_relaunch_after_sigterm_resumes_at_that_step_bit_exact(preempted):
    _, codes, results = preempted
    assert codes["sigterm_resume"] == codes["sigterm_straight"] == 0
    for resumed, straight in zip(results["sigterm_resume"], results["sigterm_straight"]):
        assert resumed["restored_step"] == 6 and resumed["global_step"] == 10
        assert torch.equal(resumed["w"], straight["w"]) and torch.equal(resumed["b"], straight["b"])
        for a, b in zip(resumed["momentum"], straight["momentum"]):
            assert torch.equal(a, b)
