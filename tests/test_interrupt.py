"""utils.interrupt: SIGINT and SIGTERM become a stop request, a second signal aborts, the exit code names the
signal, and the printed command continues the run."""
from __future__ import annotations

import os
import signal

import pytest

from utils.interrupt import StopRequest, resume_command


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_requests_a_stop_and_the_exit_says_how_to_resume(signum, code, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setattr("sys.argv", ["run_pre.py", "--run_dir", "old", "--seed", "3", "--resume"])
    with StopRequest("this episode") as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        assert stop.requested and stop.signal == signum
        with pytest.raises(SystemExit) as exit_:
            stop.exit_for_resume(tmp_path, "stopped in epoch 2")
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert f"{signal.Signals(signum).name}: stopping after this episode" in err
    assert err.rstrip().endswith(f"stopped in epoch 2; continue with:\n  python run_pre.py --seed 3 --resume "
                                 f"--run_dir {tmp_path}")


def test_second_signal_aborts_at_once_and_handlers_are_restored(capsys):
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as exit_:
        with StopRequest():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
    assert exit_.value.code == 130
    assert "SIGINT again: aborting now" in capsys.readouterr().err
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_a_request_from_another_process_keeps_the_first_signal():
    stop = StopRequest(announce=False)
    stop.request(signal.SIGTERM)
    stop.request(signal.SIGINT)
    assert stop.signal == signal.SIGTERM
    with pytest.raises(SystemExit) as exit_:
        stop.exit_for_resume("runs/x", "stopped")
    assert exit_.value.code == 143


def test_resume_command_drops_the_old_run_dir_and_quotes(monkeypatch):
    argv = ["/abs/run_pre.py", "--run_dir=a", "--resume", "--data_root", "my data"]
    assert resume_command("runs/b c", argv) == ("python /abs/run_pre.py --data_root 'my data' --resume "
                                                "--run_dir 'runs/b c'")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command("r", ["run_pre.py"]).startswith("torchrun --nproc_per_node 4 run_pre.py --resume")
