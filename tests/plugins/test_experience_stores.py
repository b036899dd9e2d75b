"""The json and sqlite experience stores: the shared contract, then what each promises
on its own (atomic files and snapshots; WAL, transactions and concurrent writers)."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
import subprocess
import sys

import pytest

from gym_cl_grpo import SqliteStoreConfig
from gym_cl_grpo.contracts import ExperienceStoreContract
from gym_cl_grpo.experience import Operation
from gym_cl_grpo.stores.json_store import JsonStore
from gym_cl_grpo.stores.sqlite_store import SqliteStore
from gym_core.base.errors import GymError


class TestJsonStoreContract(ExperienceStoreContract):
    @pytest.fixture
    def store_class(self):
        return JsonStore


class TestSqliteStoreContract(ExperienceStoreContract):
    @pytest.fixture
    def store_class(self):
        return SqliteStore


def test_json_store_writes_one_file_and_a_snapshot_per_step(tmp_path):
    path = tmp_path / "library.json"
    store = JsonStore(JsonStore.Config(), path)
    store.apply([Operation("ADD", text="one")], 1)
    store.apply([Operation("ADD", text="two")], 2)
    doc = json.loads(path.read_text())
    assert doc["step"] == 2
    assert [e["text"] for e in doc["experiences"]] == ["one", "two"]
    snaps = sorted(p.name for p in (tmp_path / "library.json.steps").iterdir())
    assert snaps == ["step-0.json", "step-1.json", "step-2.json"]
    assert [e["text"] for e in json.loads(
        (tmp_path / "library.json.steps/step-1.json").read_text())["experiences"]] == ["one"]
    # no temporary files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["library.json", "library.json.steps"]


def test_json_store_failed_write_leaves_the_old_library(tmp_path, monkeypatch):
    path = tmp_path / "library.json"
    store = JsonStore(JsonStore.Config(), path)
    store.apply([Operation("ADD", text="one")], 1)
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    import gym_core.base.files

    monkeypatch.setattr(gym_core.base.files, "_fsync_file", crash)  # the write fails mid-way
    with pytest.raises(OSError):
        store.apply([Operation("ADD", text="two")], 2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["library.json", "library.json.steps"]


@pytest.mark.parametrize("content,match", [
    ("{broken", "not valid JSON"),
    ('["a list"]', "not a gym experience library"),
    ('{"format": "gym.experiences/1", "step": 0, "next_key": 1, '
     '"experiences": [{"key": 0, "text": "two\\nlines"}]}', "bad entry"),
])
def test_json_store_refuses_bad_files_without_touching_them(tmp_path, content, match):
    path = tmp_path / "library.json"
    path.write_text(content)
    with pytest.raises(GymError, match=match):
        JsonStore(JsonStore.Config(), path)
    assert path.read_text() == content


def test_sqlite_store_uses_wal_and_refuses_a_foreign_schema(tmp_path):
    path = tmp_path / "lib.sqlite"
    with SqliteStore(SqliteStoreConfig(), path) as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE experiences (id INTEGER, body TEXT)")
    db.execute("INSERT INTO experiences VALUES (1, 'precious')")
    db.commit()
    db.close()
    before = other.read_bytes()
    with pytest.raises(GymError, match="not a gym experience library of the expected schema"):
        SqliteStore(SqliteStoreConfig(), other)
    assert other.read_bytes() == before
    text_file = tmp_path / "notes.sqlite"
    text_file.write_text("hello")
    with pytest.raises(GymError, match="not a SQLite database"):
        SqliteStore(SqliteStoreConfig(), text_file)
    assert text_file.read_text() == "hello"


def test_sqlite_keeps_versions_per_writer(tmp_path):
    path = tmp_path / "shared.sqlite"
    a = SqliteStore(SqliteStoreConfig(), path, writer="run-a")
    b = SqliteStore(SqliteStoreConfig(), path, writer="run-b")
    a.apply([Operation("ADD", text="from a")], 1)
    b.apply([Operation("ADD", text="from b")], 1)
    assert a.export() == b.export() == {"G0": "from a", "G1": "from b"}
    assert a.export(1) == {"G0": "from a"}
    assert b.export(0) == {"G0": "from a"}  # the library as run-b found it
    assert b.export(1) == {"G0": "from a", "G1": "from b"}
    a.close()
    b.close()


def _writer(path: str, name: str, n: int, barrier) -> None:
    store = SqliteStore(SqliteStoreConfig(), __import__("pathlib").Path(path), writer=name)
    barrier.wait()
    for step in range(1, n + 1):
        mine = [e for e in store.list() if e.text.startswith(f"{name} ")]
        ops = [Operation("ADD", text=f"{name} lesson {step}")]
        if mine:  # also edit one of its own earlier lessons in the same transaction
            ops.append(Operation("UPDATE", mine[0].key, f"{mine[0].text} (seen {step})"))
        store.apply(ops, step)
    store.close()


def test_two_processes_writing_one_sqlite_library_lose_nothing(tmp_path):
    path = tmp_path / "shared.sqlite"
    SqliteStore(SqliteStoreConfig(), path).close()  # schema first; writers then race
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    n = 40
    procs = [ctx.Process(target=_writer, args=(str(path), name, n, barrier))
             for name in ("alpha", "beta")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with SqliteStore(SqliteStoreConfig(), path, writer="alpha") as store:
        texts = [e.text for e in store.list()]
        assert len(texts) == 2 * n
        for name in ("alpha", "beta"):
            for step in range(2, n + 1):
                assert any(t.startswith(f"{name} lesson {step}") for t in texts)
            # the first lesson was updated by every later step of its writer
            first = next(t for t in texts if t.startswith(f"{name} lesson 1"))
            assert first == f"{name} lesson 1" + "".join(f" (seen {s})" for s in range(2, n + 1))
        assert store.last_step() == n


def test_show_command_prints_and_exports(tmp_path):
    path = tmp_path / "library.json"
    store = JsonStore(JsonStore.Config(), path)
    store.apply([Operation("ADD", text="one"), Operation("ADD", text="two")], 1)
    store.apply([Operation("DELETE", store.list()[0].key)], 2)
    out = subprocess.run([sys.executable, "-m", "gym_cl_grpo.experience", "show", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "[G0]. two\n"
    out = subprocess.run([sys.executable, "-m", "gym_cl_grpo.experience", "show", str(path),
                          "--json", "--step", "1"], capture_output=True, text=True)
    assert json.loads(out.stdout) == {"G0": "one", "G1": "two"}
    db = tmp_path / "lib.sqlite"
    with SqliteStore(SqliteStoreConfig(), db, writer=str(tmp_path)) as s:
        s.apply([Operation("ADD", text="from sqlite")], 1)
    out = subprocess.run([sys.executable, "-m", "gym_cl_grpo.experience", "show", str(db), "--json"],
                         capture_output=True, text=True)
    assert json.loads(out.stdout) == {"G0": "from sqlite"}
    bad = tmp_path / "junk.txt"
    bad.write_text("junk")
    out = subprocess.run([sys.executable, "-m", "gym_cl_grpo.experience", "show", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not a library" in out.stderr
