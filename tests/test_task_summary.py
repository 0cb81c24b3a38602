"""The grid summary of several tiny-task runs: every value from the run's own files, the mean over runs."""

from __future__ import annotations

import json
import math

import pytest

from megatron_rgm.config import ConfigError
from megatron_rgm.tasks.summary import main, table


def _run(path, pass1, bon, auc, lucky=None, rollouts=None):
    path.mkdir()
    metrics = {"pass@1": pass1, "maj@8": 0.5, "wmaj@8": 0.6, "oracle@8": 0.9, "bon@8/geometric": bon,
               "bon@8/arithmetic": bon - 0.1, "bon@8/product": bon, "maj@2": 0.4}
    (path / "eval.json").write_text(json.dumps(metrics))
    sprm = {"step_auc": auc, "first_error_f1": 0.5, "pairwise": 0.8, "margin": -0.25,
            "mean_score": {"right step, correct": 0.75, "right step, incorrect": pass1, "wrong step, correct": math.nan,
                           "wrong step, incorrect": 0.125}}
    if lucky is not None:
        sprm.update(lucky=lucky, lucky_masked=0.75)
    scorer = {"sprm": sprm, "wrong_agreement": 0.25, **({"rollouts": {"total": rollouts}} if rollouts else {})}
    (path / "scorer.json").write_text(json.dumps(scorer))
    return path


def test_rows_and_their_mean_by_hand(tmp_path):
    a = _run(tmp_path / "lucky-s0", 0.4, 0.7, 0.8, lucky=0.2, rollouts={"lucky": 0.3, "lucky_masked": 0.5})
    b = _run(tmp_path / "lucky-s1", 0.6, 0.9, 0.9)  # an older run: no lucky shares, left out of their mean
    text, rows = table([a, b], k=8)
    mean = rows["mean"]
    assert mean["pass@1"] == pytest.approx(0.5) and mean["BoN@8 geome"] == pytest.approx(0.8)
    assert mean["BoN@8 arith"] == pytest.approx(0.7) and mean["step AUC"] == pytest.approx(0.85)
    assert mean["lucky %"] == pytest.approx(0.2) and mean["rollouts masked %"] == pytest.approx(0.5)
    assert math.isnan(rows["lucky-s1"]["lucky %"])
    lines = text.splitlines()
    assert lines[0].startswith("| run | pass@1 | maj@8 | wmaj@8 | BoN@8 geome")
    assert lines[2].startswith("| lucky-s0 | 40.0 | 50.0 | 60.0 | 70.0 | 60.0 | 70.0 | 90.0 | 25.0 | 0.800 | 0.500 | "
                               "0.800 | -0.250 | 20.0 | 75.0 | 30.0 | 50.0 |")
    assert lines[4].startswith("| **mean** | 50.0 |") and lines[3].endswith("| 0.800 | -0.250 |  |  |  |  |")
    # the second table: the head's mean score by kind of step, nan (a kind with no step) left blank
    assert lines[6] == "| run | right step, correct | right step, incorrect | wrong step, correct | wrong step, incorrect |"
    assert lines[8] == "| lucky-s0 | 0.750 | 0.400 |  | 0.125 |" and lines[10].startswith("| **mean** | 0.750 | 0.500 |")
    _, rows = table([a], k=2)  # k=2: maj@2 read, the k=8 columns not
    assert rows["lucky-s0"]["maj@2"] == pytest.approx(0.4) and math.isnan(rows["lucky-s0"]["BoN@2 geome"])


def test_unusable_inputs_are_refused_by_name(tmp_path, capsys):
    a = _run(tmp_path / "s0", 0.4, 0.7, 0.8)
    with pytest.raises(ConfigError, match="no maj@32: pass a --k the run evaluated \\(8, 2\\)"):
        table([a], k=32)
    (tmp_path / "half").mkdir()
    assert main([str(a), str(tmp_path / "half")]) != 0
    assert "half/eval.json does not exist" in capsys.readouterr().err
    out = tmp_path / "grid.json"
    assert main([str(a), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["mean"]["pass@1"] == pytest.approx(0.4)


def test_broken_files_and_names_are_refused_by_name(tmp_path):
    a = _run(tmp_path / "s0", 0.4, 0.7, 0.8)
    (a / "scorer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="s0/scorer.json is not readable JSON .*python -m megatron_rgm.tasks.probe"):
        table([a])
    (a / "scorer.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no 'sprm' metrics"):
        table([a])
    (tmp_path / "x").mkdir()
    b, c = _run(tmp_path / "mean", 0.4, 0.7, 0.8), _run(tmp_path / "x" / "s1", 0.4, 0.7, 0.8)
    with pytest.raises(ConfigError, match="'mean' is the mean row"):
        table([b])
    d = _run(tmp_path / "s1", 0.5, 0.7, 0.8)
    with pytest.raises(ConfigError, match="'s1' is given twice"):
        table([c, d])


def test_json_output_is_strict_and_its_folder_made(tmp_path):
    a = _run(tmp_path / "s0", 0.4, 0.7, 0.8)  # no lucky shares: nan in the table, null in the file
    out = tmp_path / "new" / "grid.json"
    assert main([str(a), "--json", str(out)]) == 0
    rows = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert rows["s0"]["lucky %"] is None and rows["mean"]["pass@1"] == pytest.approx(0.4)


def _samples(path, problems):
    """A samples.jsonl of ``problems``: per problem, candidates as (step scores, correct)."""
    with open(path / "samples.jsonl", "w") as f:
        for i, cands in enumerate(problems):
            rows = [{"step_scores": s, "correct": c} for s, c in cands]
            f.write(json.dumps({"id": f"p{i}", "candidates": rows}) + "\n")


def test_the_length_table_by_hand(tmp_path, capsys):
    a = _run(tmp_path / "long-s0", 0.5, 0.5, 0.8)
    # problem 0: a long correct candidate of mid-range steps and a short wrong one: the product picks the short
    # one (0.8^3 * 0.3 = 0.154 > 0.8^10 = 0.107), the geometric mean (0.8 vs 0.626) and the arithmetic the long one
    # problem 1: equal lengths, every aggregation picks the same correct candidate
    _samples(a, [[([0.8] * 10, True), ([0.8] * 3 + [0.3], False)],
                 [([0.9, 0.9], True), ([0.9, 0.2], False)]])
    from megatron_rgm.tasks.summary import length_row
    row = length_row(a, k=2)
    assert row["steps, correct"] == pytest.approx(6) and row["steps, incorrect"] == pytest.approx(3)
    assert row["lengths differ %"] == pytest.approx(0.5)
    assert row["BoN@2 geometric %"] == pytest.approx(1.0) and row["BoN@2 arithmetic %"] == pytest.approx(1.0)
    assert row["BoN@2 product %"] == pytest.approx(0.5)
    assert row["product: pick steps"] == pytest.approx(3) and row["geometric: pick steps"] == pytest.approx(6)
    assert row["product: picks shortest %"] == pytest.approx(1.0)
    assert row["geometric: picks shortest %"] == pytest.approx(0.5)
    one = length_row(a, k=1)  # groups of one: nothing differs, every pick is its group's shortest
    assert one["lengths differ %"] == 0.0 and one["product: picks shortest %"] == 1.0
    assert one["BoN@1 geometric %"] == pytest.approx(0.5)  # the mean over each problem's two groups, then problems
    # a candidate without steps scores 0 and stays in (2 steps vs 0: lengths differ); a stopped one is picked last
    _samples(a, [[([], True), ([0.1], False)], [([0.9], True), ([0.2], False)]])
    (a / "samples.jsonl").write_text((a / "samples.jsonl").read_text().replace(
        '"id": "p1",', '"id": "p1", "stopped": [true, false],'))
    row = length_row(a, k=2)
    assert row["lengths differ %"] == 0.5 and row["BoN@2 geometric %"] == 0.0 and row["steps, correct"] == 0.5
    with pytest.raises(ConfigError, match="fewer than k=4"):
        length_row(a, k=4)
    _samples(a, [[([0.8] * 10, True), ([0.8] * 3 + [0.3], False)], [([0.9, 0.9], True), ([0.9, 0.2], False)]])
    out = tmp_path / "grid.json"
    assert main([str(a), "--lengths", "--k", "2", "--json", str(out)]) == 0
    assert "| long-s0 | 6.0 | 3.0 | 50.0 | 100.0 | 6.0 | 50.0 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["mean"]["BoN@2 product %"] == pytest.approx(0.5)
    b = _run(tmp_path / "no-samples", 0.5, 0.5, 0.8)
    assert main([str(b), "--lengths", "--k", "2"]) != 0
    assert "no-samples/samples.jsonl does not exist" in capsys.readouterr().err
