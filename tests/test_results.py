"""Result files: strict JSON, whole files, and one schema version read back."""
import json

import pytest

from quantbench import results


def _strict(text):
    """Python's json with NaN, Infinity and -Infinity refused, as jq and JSON.parse refuse them."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_a_non_finite_number_is_written_as_null_beside_what_it_was(tmp_path):
    results.write_json(tmp_path / "r.json", {"quality": {"perplexity": float("nan"), "kld": {"kld_max": float("inf")}},
                                             "points": [1.0, float("-inf")], "ok": 2.5})
    data = _strict((tmp_path / "r.json").read_text())
    assert data["quality"] == {"perplexity": None, "perplexity_nonfinite": "nan",
                               "kld": {"kld_max": None, "kld_max_nonfinite": "inf"}}
    assert data["points"] == [1.0, None] and data["ok"] == 2.5


def test_a_run_folder_of_another_schema_is_refused_in_one_line(tmp_path):
    results.write_json(tmp_path / "run.json", {"schema": results.SCHEMA, "experiments": [{"id": "fp16"}, {"id": "nf4"}]})
    results.write_json(tmp_path / "fp16.json", {"schema": results.SCHEMA, "experiment": "fp16"})
    run, found = results.load_run(tmp_path)
    assert [r["experiment"] for r in found] == ["fp16"]  # nf4 not written yet
    results.write_json(tmp_path / "fp16.json", {"quantbench_run": 1, "experiment": "fp16"})  # an older quantbench's
    with pytest.raises(results.ResultsError, match=rf"fp16.json has result schema 1, this quantbench reads schema "
                                                   rf"{results.SCHEMA} \(docs/results.md\): run it again"):
        results.load_run(tmp_path)
    with pytest.raises(results.ResultsError, match="not a quantbench run folder"):
        results.load_run(tmp_path / "nothing")


def test_per_document_scores_read_back_by_document(tmp_path):
    results.write_json(tmp_path / "nf4.docs.json", {"schema": results.SCHEMA, "arc_easy": {"doc_ids": [3, 7], "acc": [1.0, 0.0]}})
    assert results.documents(tmp_path, {"experiment": "nf4"}) == {"arc_easy": {"acc": {3: 1.0, 7: 0.0}}}
    assert results.documents(tmp_path, {"experiment": "int8"}) == {}


def test_files_from_a_worker_are_written_whole(tmp_path):
    results.write_files(tmp_path, {"nf4.json": b"{}", "reference/m/reference.json": b"[]"})
    assert (tmp_path / "nf4.json").read_bytes() == b"{}" and (tmp_path / "reference" / "m" / "reference.json").exists()
    assert not list(tmp_path.rglob("*.part"))
