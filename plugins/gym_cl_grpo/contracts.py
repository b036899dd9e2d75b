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


def expect(got, expected, what: str) -> None:
    """assert got == expected, saying what was checked, what was expected and what came
    back (pytest does not rewrite the asserts of an installed package)."""
    assert got == expected, f"{what}: expected {expected!r}, got {got!r}"


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
        expect(store.list(), [], "store.list()")
        expect(store.last_step(), 0, "store.last_step()")
        expect(store.export(), {}, "store.export()")

    def test_adds_are_listed_in_order_and_survive_reopening(self, open_store, store_class, path):
        store = open_store()
        result = store.apply([add("When adding, carry the ten."), add("Check the units.")], 1)
        expect((result.added, result.size, result.step), (2, 2, 1), "(result.added, result.size, result.step)")
        store.close()
        again = open_store()
        expect(again.export(), {"G0": "When adding, carry the ten.", "G1": "Check the units."}, "again.export()")
        expect(again.last_step(), 1, "again.last_step()")
        assert store_class.recognizes(path), f"{store_class.__name__}.recognizes({path}) is " \
            "False for a library it wrote"

    def test_update_delete_and_renumbering(self, open_store):
        store = open_store()
        store.apply([add("a"), add("b"), add("c")], 1)
        keys = [e.key for e in store.list()]
        result = store.apply([Operation("DELETE", keys[0]), Operation("UPDATE", keys[2], "c2"),
                              Operation("NONE")], 2)
        expect((result.deleted, result.updated, result.skipped, result.size), (1, 1, 1, 2), "(result.deleted, result.updated, result.skipped, result.size)")
        # G-ids are positions: the old G1 is now G0; keys stay what they were
        expect(store.export(), {"G0": "b", "G1": "c2"}, "store.export()")
        expect([e.key for e in store.list()], keys[1:], "[e.key for e in store.list()]")
        store.apply([add("d")], 3)
        new_key = max(e.key for e in store.list())
        assert new_key > max(keys), f"keys are never reused: a new entry got key {new_key}, " \
            f"at most the earlier {max(keys)}"

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
        expect(store.export(), {"G0": "second", "G1": "New lesson"}, "store.export()")
        expect((result.added, result.deleted, result.updated), (1, 1, 1), "(result.added, result.deleted, result.updated)")
        expect(result.skipped, 3, "result.skipped")  # the duplicate ADD, the missing key, the lost UPDATE

    def test_every_step_can_be_read_back(self, open_store):
        store = open_store()
        store.apply([add("one")], 1)
        store.apply([add("two")], 2)
        store.apply([Operation("DELETE", store.list()[0].key)], 3)
        expect(as_library(store.at_step(0)), {}, "as_library(store.at_step(0))")
        expect(as_library(store.at_step(1)), {"G0": "one"}, "as_library(store.at_step(1))")
        expect(as_library(store.at_step(2)), {"G0": "one", "G1": "two"}, "as_library(store.at_step(2))")
        expect(store.export(3), {"G0": "two"}, "store.export(3)")
        with pytest.raises(GymError):
            store.at_step(7)

    def test_rewind_restores_a_step_and_forgets_later_ones(self, open_store):
        store = open_store()
        for step, text in enumerate(["one", "two", "three"], start=1):
            store.apply([add(text)], step)
        store.rewind(1)
        expect(store.export(), {"G0": "one"}, "store.export()")
        expect(store.last_step(), 1, "store.last_step()")
        store.close()
        again = open_store()  # the rewind is persistent
        expect((again.export(), again.last_step()), ({"G0": "one"}, 1),
               "(export, last_step) after reopening a rewound store")
        result = again.apply([add("two, again")], 2)
        expect(result.size, 2, "result.size")
        expect(again.export(2), {"G0": "one", "G1": "two, again"}, "again.export(2)")
        with pytest.raises(GymError):
            again.at_step(3)

    def test_applying_an_old_step_is_refused(self, open_store):
        store = open_store()
        store.apply([add("one")], 1)
        with pytest.raises(ValueError):
            store.apply([add("two")], 1)
        expect(store.export(), {"G0": "one"}, "store.export()")

    def test_retrieve_returns_experiences_of_the_library(self, open_store):
        store = open_store()
        store.apply([add("x"), add("y")], 1)
        got = store.retrieve("What is 2 + 2?")
        assert all(isinstance(e, Experience) for e in got), f"retrieve returned {got!r}"
        assert set(got) <= set(store.list()), f"retrieve returned entries not in the " \
            f"library: {set(got) - set(store.list())}"

    def test_unicode_text_round_trips(self, open_store):
        store = open_store()
        text = 'Quand "x" ≥ 10 — 注意进位 \\boxed{} 🙂'
        store.apply([add(text)], 1)
        store.close()
        expect(open_store().export(), {"G0": text}, "open_store().export()")

    def test_a_file_that_is_not_a_library_is_refused_and_left_alone(self, open_store, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        junk = b'{"not": "a library"'  # neither valid JSON nor a database
        path.write_bytes(junk)
        with pytest.raises(GymError, match=str(path.name)):
            open_store()
        expect(path.read_bytes(), junk, "path.read_bytes()")
