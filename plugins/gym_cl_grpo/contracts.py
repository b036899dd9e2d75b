"""The contract every ``experience_store=<name>`` implementation passes.

A store's test file subclasses :class:`ExperienceStoreContract` and provides a
``store_class`` fixture (the class) and optionally ``store_config``::

    import pytest
    from gym_cl_grpo.contracts import ExperienceStoreContract
    from my_plugin.store import MyStore

    class TestMyStore(ExperienceStoreContract):
        @pytest.fixture
        def store_class(self):
            return MyStore

Each test opens stores at a fresh path under ``tmp_path`` with ``store_class(cfg, path,
writer)`` and checks what gym relies on: operations mean the same in every store,
ids are renumbered G0..Gn while keys stay stable, a batch survives closing and
reopening, every step's version can be read back and rewound to, and a library that is
not one is refused without being touched.
"""

from __future__ import annotations

import pytest

from gym_cl_grpo.experience import Experience, ExperienceStore, Operation, as_library
from gym_core.api import GymError


def add(text):
    return Operation("ADD", text=text)


class ExperienceStoreContract:
    @pytest.fixture
    def store_class(self) -> type[ExperienceStore]:
        raise NotImplementedError("provide the store class under test as a fixture")

    @pytest.fixture
    def store_config(self, store_class):
        return store_class.Config()

    @pytest.fixture
    def path(self, tmp_path, store_class):
        return tmp_path / "lib" / store_class.default_filename

    @pytest.fixture
    def open_store(self, store_class, store_config, path):
        opened = []

        def open_(writer="run-a", at=None):
            store = store_class(store_config, at or path, writer)
            opened.append(store)
            return store

        yield open_
        for store in opened:
            store.close()

    def test_a_new_store_is_empty(self, open_store):
        store = open_store()
        assert store.list() == []
        assert store.last_step() == 0
        assert store.export() == {}

    def test_adds_are_listed_in_order_and_survive_reopening(self, open_store, store_class, path):
        store = open_store()
        result = store.apply([add("When adding, carry the ten."), add("Check the units.")], 1)
        assert (result.added, result.size, result.step) == (2, 2, 1)
        store.close()
        again = open_store()
        assert again.export() == {"G0": "When adding, carry the ten.", "G1": "Check the units."}
        assert again.last_step() == 1
        assert store_class.recognizes(path)

    def test_update_delete_and_renumbering(self, open_store):
        store = open_store()
        store.apply([add("a"), add("b"), add("c")], 1)
        keys = [e.key for e in store.list()]
        result = store.apply([Operation("DELETE", keys[0]), Operation("UPDATE", keys[2], "c2"),
                              Operation("NONE")], 2)
        assert (result.deleted, result.updated, result.skipped, result.size) == (1, 1, 1, 2)
        # G-ids are positions: the old G1 is now G0; keys stay what they were
        assert store.export() == {"G0": "b", "G1": "c2"}
        assert [e.key for e in store.list()] == keys[1:]
        store.apply([add("d")], 3)
        assert max(e.key for e in store.list()) > max(keys)  # keys are never reused

    def test_reconciliation_rules(self, open_store):
        store = open_store()
        store.apply([add("keep"), add("target")], 1)
        k_keep, k_target = (e.key for e in store.list())
        result = store.apply([
            Operation("UPDATE", k_target, "changed"),
            Operation("DELETE", k_target),          # DELETE beats UPDATE of the same key
            Operation("UPDATE", k_keep, "first"),
            Operation("UPDATE", k_keep, "second"),  # the last UPDATE of a key wins
            add("New lesson"), add("new LESSON"),  # duplicate ADDs are merged (case, spacing)
            Operation("DELETE", 10_000),            # a key that does not exist: skipped
        ], 2)
        assert store.export() == {"G0": "second", "G1": "New lesson"}
        assert (result.added, result.deleted, result.updated) == (1, 1, 1)
        assert result.skipped == 3  # the duplicate ADD, the missing key, the lost UPDATE

    def test_every_step_can_be_read_back(self, open_store):
        store = open_store()
        store.apply([add("one")], 1)
        store.apply([add("two")], 2)
        store.apply([Operation("DELETE", store.list()[0].key)], 3)
        assert as_library(store.at_step(0)) == {}
        assert as_library(store.at_step(1)) == {"G0": "one"}
        assert as_library(store.at_step(2)) == {"G0": "one", "G1": "two"}
        assert store.export(3) == {"G0": "two"}
        with pytest.raises(GymError):
            store.at_step(7)

    def test_rewind_restores_a_step_and_forgets_later_ones(self, open_store):
        store = open_store()
        for step, text in enumerate(["one", "two", "three"], start=1):
            store.apply([add(text)], step)
        store.rewind(1)
        assert store.export() == {"G0": "one"}
        assert store.last_step() == 1
        store.close()
        again = open_store()  # the rewind is persistent
        assert again.export() == {"G0": "one"} and again.last_step() == 1
        result = again.apply([add("two, again")], 2)
        assert result.size == 2
        assert again.export(2) == {"G0": "one", "G1": "two, again"}
        with pytest.raises(GymError):
            again.at_step(3)

    def test_applying_an_old_step_is_refused(self, open_store):
        store = open_store()
        store.apply([add("one")], 1)
        with pytest.raises(ValueError):
            store.apply([add("two")], 1)
        assert store.export() == {"G0": "one"}

    def test_retrieve_returns_experiences_of_the_library(self, open_store):
        store = open_store()
        store.apply([add("x"), add("y")], 1)
        got = store.retrieve("What is 2 + 2?")
        assert all(isinstance(e, Experience) for e in got)
        assert set(got) <= set(store.list())

    def test_unicode_text_round_trips(self, open_store):
        store = open_store()
        text = 'Quand "x" ≥ 10 — 注意进位 \\boxed{} 🙂'
        store.apply([add(text)], 1)
        store.close()
        assert open_store().export() == {"G0": text}

    def test_a_file_that_is_not_a_library_is_refused_and_left_alone(self, open_store, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        junk = b'{"not": "a library"'  # neither valid JSON nor a database
        path.write_bytes(junk)
        with pytest.raises(GymError, match=str(path.name)):
            open_store()
        assert path.read_bytes() == junk
