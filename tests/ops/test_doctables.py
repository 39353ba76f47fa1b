"""The generated tables of the docs (ops/doctables.py): current, and read off dvc.yaml as it says."""

from __future__ import annotations

import pytest

from ops import doctables
from ops.code import ROOT

FEATURES = "ensemble_features@<backbone>"


def rerun_of(key: str) -> list[str]:
    """The stages that a change of `key` (a row of the reruns table) re-runs."""
    return next(reran for name, _, _, reran in doctables.reruns() if name == key)


@pytest.mark.parametrize("doc", doctables.docs(), ids=lambda path: str(path.relative_to(ROOT)))
def test_the_docs_hold_the_tables_as_the_generator_renders_them_now(doc):
    text = doc.read_text(encoding="utf-8")
    assert doctables.render(text, ROOT, str(doc)) == text, (
        f"{doc.relative_to(ROOT)} holds stale generated tables: run `python -m ops.doctables`"
    )


def test_each_table_is_in_some_doc():
    text = "\n".join(doc.read_text(encoding="utf-8") for doc in doctables.docs())
    for name in doctables.TABLES:
        assert doctables.START.format(name=name) in text, f"no doc holds the table {name!r}"


def test_precision_re_runs_every_stage_that_computes_in_it_and_what_follows():
    assert rerun_of("precision") == [
        "featurize",
        "train_top",
        "finetune",
        "evaluate",
        "baseline",
        FEATURES,
        "ensemble",
        "audit",
        "export",
        "compare",
    ]


def test_top_pool_re_runs_the_head_the_fine_tuning_the_ensemble_members_and_the_audit():
    assert rerun_of("top.pool") == [
        "train_top",
        "finetune",
        "evaluate",
        FEATURES,
        "ensemble",
        "audit",
        "export",
        "compare",
    ]


def test_a_learning_rate_of_fine_tuning_re_runs_finetune_evaluate_export_and_compare_only():
    assert rerun_of("finetune") == ["finetune", "evaluate", "export", "compare"]


def test_a_param_no_stage_lists_re_runs_compare_only():
    rows = {name: reran for name, _, _, reran in doctables.reruns()}
    assert rows["evaluate.registered_model"] == ["compare"]


def test_every_listed_param_re_runs_compare():
    assert all(reran[-1] == "compare" for _, _, _, reran in doctables.reruns())


def test_a_foreach_stage_is_one_stage_with_its_item_named():
    stage = next(s for s in doctables.stages() if s.name == FEATURES)
    assert stage.outs == ("data/ensemble/<backbone>",)
    assert "<backbone>" in stage.cmd


def test_downstream_follows_outputs_into_the_folders_that_hold_them():
    # ensemble depends on data/ensemble, which holds each member's data/ensemble/<backbone>
    assert doctables.downstream(doctables.stages(), {FEATURES}) == [FEATURES, "ensemble", "export", "compare"]


def test_the_params_table_has_every_key_of_params_yaml():
    table = doctables.params_table()
    for key in doctables.flat_params():
        assert f"| `{key}` |" in table


def test_check_names_a_stale_file_and_fails(tmp_path, capsys, monkeypatch):
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "page.md"
    doc.write_text(f"# Page\n\n{doctables.START.format(name='stages')}\nold\n{doctables.END}\n", encoding="utf-8")
    monkeypatch.setattr(doctables, "ROOT", tmp_path)
    assert doctables.main(["--check"]) == 1
    assert "docs/page.md" in capsys.readouterr().err
    assert doctables.main([]) == 0
    assert doctables.stages_table(tmp_path) in doc.read_text(encoding="utf-8")
    assert doctables.main(["--check"]) == 0
