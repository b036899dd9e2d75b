"""The main job's summary says where its scores sit against the README's table
(gym_core/train/reference.py), and the table's numbers are the README's."""

from __future__ import annotations

from gym_core.plugin.startup import bootstrap, compose
from gym_core.train import reference
from tests.conftest import REPO


def test_only_the_main_job_is_compared():
    plugins = bootstrap()
    same = ["algorithm=grpo", "quant=bitdelta", "trainer.seed=2", "trainer.threads=1",
            "run.name=mine", "logger=[]"]
    assert reference.is_main_job(compose(same), plugins)
    for other in (["trainer.max_steps=10"], ["algorithm=dapo"], ["model=tiny"],
                  ["algorithm.lr=1e-4"], ["data.max_value=9"]):
        assert not reference.is_main_job(compose([*same, *other]), plugins), other


def test_the_table_places_each_score():
    cfg = compose(["algorithm=grpo", "quant=bitdelta"])
    low = reference.REFERENCE["scores"]["after"][1]
    high = reference.REFERENCE["scores"]["after_quant"][2]
    pref_high = reference.REFERENCE["scores"]["preference_after"][2]
    result = reference.compare(cfg, {"eval": {
        "before": None, "after": low - 0.07, "after_quant": high,
        "preference_accuracy": {"before": 0.5, "after": pref_high + 0.03}}}, bootstrap())
    assert result["scores"]["after"]["where"] == "below by 0.07"
    assert result["scores"]["after_quant"]["where"] == "inside"
    assert result["scores"]["preference_after"]["where"] == "above by 0.03"
    assert "before" not in result["scores"]
    text = reference.table(result)
    assert "README mean [range]" in text and "below by 0.07" in text
    assert reference.compare(compose(["model=tiny"]), {"eval": {}}, bootstrap()) is None


def test_the_numbers_are_the_readmes():
    """Row by row: the README table's mean and range are REFERENCE's, for the seeds it
    names."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What the main job does", 1)[1].split("\n## ", 1)[0]
    rows = {"before": "| before training |", "after": "| after 30 GRPO steps (LoRA) |",
            "after_quant": "| after BitDelta ", "preference_after": "| held-out preference "}
    assert set(reference.REFERENCE["scores"]) == set(rows)  # every row of the table
    for key, (mean, low, high) in reference.REFERENCE["scores"].items():
        (line,) = [ln for ln in section.splitlines() if ln.startswith(rows[key])]
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if key == "preference_after":  # "before -> after"
            cells[1] = cells[1].split("->")[-1].strip()
        assert cells[1:3] == [f"{mean:.2f}", f"{low:.2f} - {high:.2f}"], (key, cells)
    seeds = reference.REFERENCE["seeds"]
    assert f"seeds {', '.join(map(str, seeds[:-1]))} and {seeds[-1]}" in section
    assert "seed 0, 1, 2 |" in section and len(seeds) == 3
