"""An engine process ends with the process that spawned it (core_process.end_with_parent),
even when that one exits without ending it (a failed start, a kill)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, os, time
    from tandem.engine.core_process import end_with_parent

    def child(watch):
        if watch:
            end_with_parent()
        time.sleep(120)

    if __name__ == "__main__":
        import sys
        p = mp.get_context("spawn").Process(target=child, args=(sys.argv[1] == "1",))
        p.start()
        print(p.pid, flush=True)
        time.sleep(3)  # the child is running (importing, then sleeping)
        os._exit(0)  # no atexit: the child is left behind, as after a failed start
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _orphan(tmp_path, watch: bool) -> tuple[int, subprocess.Popen]:
    """Run the spawner; (its child's pid, the spawner, ended; its stdout still open)."""
    script = tmp_path / "spawner.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), "1" if watch else "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    pid = int(proc.stdout.readline())
    assert proc.wait(timeout=60) == 0
    return pid, proc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_engine_process_ends_with_its_parent(tmp_path):
    pid, proc = _orphan(tmp_path, watch=True)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    assert proc.stdout.read() == ""  # EOF: nothing holds the spawner's output open


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_without_the_watch_the_orphan_lives_on(tmp_path):
    """The control: what the watch prevents (so the test above can fail)."""
    pid, proc = _orphan(tmp_path, watch=False)
    try:
        time.sleep(2)
        assert _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, 9)
        proc.stdout.close()
