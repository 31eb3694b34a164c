"""Kill-and-resume helper shared by the resume tests (one process, tests/test_resume.py; two FSDP2 processes
through ``accelerate launch``, tests/test_fsdp.py)."""

import os
import signal
import subprocess
import tempfile
import time

import psutil  # an accelerate dependency
import pytest


def sigkill_after_checkpoint(argv, output_dir, step: int, *, env, cwd=None, timeout: float = 400) -> None:
    """Run ``argv`` and SIGKILL it, with every process it started, as soon as ``output_dir/checkpoint-<step>``
    is complete (its ``trainer_state.json``, written last, exists).

    Every process of the run is killed, as a machine failure would: the command and all its descendants.
    A process group is not enough: torchrun (``accelerate launch``) starts each worker in a session of its
    own, so killing the launcher's group leaves the workers running on to the end of training, writing into
    the output directory the resumed run then uses.
    Fails the test if the command exits before the checkpoint, if the checkpoint does not come within
    ``timeout`` seconds, or if the run had already finished when the kill landed (then nothing was tested).
    """
    marker = os.path.join(str(output_dir), f"checkpoint-{step}", "trainer_state.json")
    # stderr goes to a file, not a pipe: a pipe nobody reads while waiting could fill and stall the run
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(marker):
            if proc.poll() is not None:
                err.seek(0)
                pytest.fail(f"training exited before checkpoint-{step} (exit {proc.returncode}): "
                            f"{err.read().decode(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint-{step} within {timeout:.0f} s")
            time.sleep(0.02)
    finally:
        _kill_tree(proc)
        err.close()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed (exit {proc.returncode})"
    assert not os.path.exists(os.path.join(str(output_dir), "model.safetensors")), (
        "the run finished before the kill; nothing was tested")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every descendant (listed before any is killed, so none is orphaned unseen), then
    wait until all are gone."""
    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:  # already exited and reaped
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    _, alive = psutil.wait_procs([p for p in procs if p.pid != proc.pid], timeout=60)
    assert not alive, f"processes survived SIGKILL: {alive}"
