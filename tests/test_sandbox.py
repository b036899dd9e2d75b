"""The Python tool's sandbox (gym_core/env/sandbox.py): code that tries to escape is
contained and the episode gets an error observation. Skipped, with the reason, on a
machine that refuses namespaces (there the tool refuses to start: tested too)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from gym_core.env import sandbox as sb

problem = sb.confinement_problem()
needs = pytest.mark.skipif(problem is not None, reason=str(problem))


@pytest.fixture(scope="module")
def box():
    return sb.PythonSandbox(cpu_seconds=2, memory_mb=256, wall_seconds=3, max_output_chars=500)


@needs
def test_code_runs_and_its_folder_is_writable(box):
    assert box.run("open('a.txt', 'w').write('hi'); print(open('a.txt').read(), 6 * 7)") \
        == "hi 42\n"


@needs
def test_no_network(box):
    # a listener on this machine's loopback: the sandbox's own loopback is another one
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        out = box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                      "timeout=2)\nprint('connected')")
    finally:
        server.close()
    assert "connected" not in out and "error: exit code 1" in out
    assert "Connection refused" in out or "unreachable" in out


@needs
def test_no_writes_outside_its_folder(box, tmp_path):
    targets = [tmp_path / "escape.txt", "/tmp/gym-escape.txt", "/dev/shm/gym-escape",
               os.path.expanduser("~/gym-escape.txt"), "/var/tmp/gym-escape.txt"]
    code = "\n".join(f"try:\n    open({str(t)!r}, 'w').write('x')\n    print('WROTE', {str(t)!r})\n"
                     "except OSError as e:\n    print('refused', e.errno)" for t in targets)
    out = box.run(code)
    assert "WROTE" not in out and out.count("refused") == len(targets)
    assert not any(os.path.exists(str(t)) for t in targets)


@needs
def test_a_fork_bomb_is_contained(box):
    out = box.run("import os\nwhile True:\n    os.fork()")
    assert "error:" in out
    assert os.system("pgrep -u nobody -f main.py > /dev/null") != 0  # nothing left behind


@needs
def test_allocating_10_gb_fails_inside(box):
    out = box.run("x = bytearray(10 * 2**30)\nprint('allocated')")
    assert "MemoryError" in out and "allocated" not in out


@needs
def test_sleeping_forever_is_killed(box):
    out = box.run("import time\nprint('start', flush=True)\ntime.sleep(10**6)")
    assert out.startswith("start") and "error: killed after" in out


@needs
def test_burning_cpu_hits_the_cpu_limit():
    box = sb.PythonSandbox(cpu_seconds=1, memory_mb=256, wall_seconds=20)
    out = box.run("while True:\n    pass")
    assert "error: CPU-time limit" in out or "error: killed" in out


@needs
def test_printing_100_mb_is_cut(box):
    out = box.run("import sys\nfor _ in range(100):\n    sys.stdout.write('a' * 2**20)")
    assert len(out) < 700 and "[output cut at 500 characters]" in out and "error:" in out


@needs
def test_the_tool_runs_in_parallel_episodes(box):
    outs = [None] * 4

    def go(i):
        outs[i] = box.run(f"print({i} * 10)")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert outs == [f"{i * 10}\n" for i in range(4)]


def test_without_namespaces_the_tool_refuses_in_one_line(monkeypatch):
    monkeypatch.setattr(sb, "confinement_problem", lambda: "this machine refuses new namespaces")
    with pytest.raises(sb.GymError, match="^env=python: this machine refuses new namespaces$"):
        sb.PythonSandbox()
