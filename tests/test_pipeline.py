"""The tiny preset's pipeline, shrunken: every stage runs, every artefact is written, the table matches the samples."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, clean_env

AGGREGATIONS = ("geometric", "arithmetic", "product", "min", "last")


@pytest.mark.multirank
def test_shrunken_pipeline_writes_every_artefact_and_a_consistent_table(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rgm.tasks.pipeline", "--output", str(out), "--n-train", "48", "--n-eval",
         "6", "--n-sft", "192", "--sft-iters", "8", "--sft-batch", "16", "--rgm-iters", "2", "--prompts-per-iter",
         "2", "--k", "4", "--eval-k", "4", "--ks", "1", "2", "4", "--max-response", "40", "--mask-warmup-iters", "1"],
        env=clean_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"output: {out}"
    # The table is printed last: the aggregations, then the decode tokens a group of k spent.
    assert lines[-3].startswith("| bon@k/last") and lines[-2].startswith("| tokens@k |")
    for name in ("task/tokenizer/tokenizer.model", "task/train_prompts.jsonl", "task/eval_prompts.jsonl",
                 "sft/latest_checkpointed_iteration.txt", "rgm/latest_checkpointed_iteration.txt",
                 "rgm/hf_assets/tokenizer.model", "rollouts/zarr.json", "hf/score_module.pt", "hf/config.json",
                 "hf/tokenizer.model", "samples.jsonl", "eval.json", "eval.md", "accuracy_vs_k.png",
                 "score_divergence.png", "train_metrics.jsonl", "scorer.json"):
        assert (out / name).exists(), name
    train = [json.loads(line) for line in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert len(train) == 2
    # --mask-warmup-iters 1: the head's first iteration is plain BCE (no mask, no class counts), the second SPR
    assert "spr positives" not in train[0] and "spr positives" in train[1]
    assert "the head on plain BCE for the first 1" in proc.stdout
    # The head reads the last layer at this size (docs/RESULTS.md), and the export says so for serving.
    assert json.loads((out / "hf" / "sprm_config.json").read_text())["sprm_layer"] == -1

    from megatron_rgm.data.store import RolloutStore

    assert len(RolloutStore(out / "rollouts", "r")) == 2 * 2 * 4  # iterations x prompts x k

    metrics = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["responses"]) == 4 for r in rows)
    # pass@1 and BoN@4 (one group of 4 per problem) recomputed from the stored samples.
    correct = [[c["correct"] for c in r["candidates"]] for r in rows]
    assert metrics["pass@1"] == pytest.approx(np.mean([np.mean(c) for c in correct]))
    for agg in AGGREGATIONS:
        assert f"bon@4/{agg}" in metrics and f"bon@2/{agg}" in metrics
    geo = []
    for r, c in zip(rows, correct):
        scores = [math.exp(np.mean(np.log(np.clip(s, 1e-10, None)))) if s else 0.0 for s in r["step_scores"]]
        geo.append(c[int(np.argmax(scores))])
    assert metrics["bon@4/geometric"] == pytest.approx(np.mean(geo))
    assert "maj@4" in metrics and 0 <= metrics["maj@4"] <= 1
    tokens = [r["tokens"] for r in rows]
    assert metrics["tokens@4"] == pytest.approx(np.mean([sum(t) for t in tokens]))
    assert lines[-2] == "| tokens@k | " + " | ".join(
        f"{metrics[f'tokens@{k}']:.0f}" for k in (1, 2, 4)) + " |"
    # The scorer report reads the same samples: its head BoN and pass@1 are the table's.
    scorer = json.loads((out / "scorer.json").read_text())
    assert scorer["candidates"] == 24 and scorer["pass@1"] == pytest.approx(metrics["pass@1"])
    assert scorer["sprm"]["bon@4"] == pytest.approx(metrics["bon@4/geometric"])
    assert scorer["probe"] is None or 0 <= scorer["probe"]["bon@4"] <= 1
    # ... and the training rollouts' lucky share (the store's correct rollouts with parseable steps)
    store = RolloutStore(out / "rollouts", "r")
    assert scorer["rollouts"]["total"]["correct"] <= sum(bool(store[i].correct) for i in range(len(store)))


def test_pipeline_refuses_a_non_empty_output(tmp_path, capsys):
    from megatron_rgm.tasks.pipeline import main

    (tmp_path / "x").write_text("keep me")
    assert main(["--output", str(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"
    fresh = tmp_path / "fresh"
    assert main(["--output", str(fresh), "--long", "--max-tokens-per-microbatch", "100"]) == 2
    assert "--max-tokens-per-microbatch 100 cannot hold one sequence" in capsys.readouterr().err
    assert not fresh.exists()
    # the head's mask warm-up: the pipeline's own flag, below the RGM iterations, never given twice
    assert main(["--output", str(fresh), "--rgm-iters", "5"]) == 2  # the default warm-up is 5
    assert "--mask-warmup-iters 5 must be >= 0 and below --rgm-iters 5" in capsys.readouterr().err
    assert main(["--output", str(fresh), "--mask-warmup-iters", "-1"]) == 2
    assert "--mask-warmup-iters -1 must be >= 0" in capsys.readouterr().err
    for flag in (["--sprm-mask-warmup-iters", "0"], ["--sprm-mask-warmup-iters=0"], ["--sprm-mask-warmup", "0"]):
        assert main(["--output", str(fresh), "--", *flag]) == 2
        assert "pass --mask-warmup-iters N before --" in capsys.readouterr().err
    assert main(["--output", str(fresh), "--rgm-iters", "0"]) == 2
    assert "--rgm-iters must be >= 1, got 0" in capsys.readouterr().err
    assert not fresh.exists()


def test_sft_from_a_run_with_other_knobs_is_refused(tmp_path, capsys):
    from megatron_rgm.tasks.knobs import LONG_RESPONSE, Knobs
    from megatron_rgm.tasks.pipeline import LONG_MICROBATCH_TOKENS, main, response_budget, task_flags
    from megatron_rgm.tasks.prepare import prepare

    src = tmp_path / "lucky"
    prepare(src / "task", n_train=8, n_eval=2, n_sft=8, knobs=Knobs(lucky=0.5))
    (src / "sft").mkdir()
    (src / "sft" / "latest_checkpointed_iteration.txt").write_text("2000")
    out = tmp_path / "out"
    assert main(["--output", str(out), "--sft-from", str(src), "--systematic", "0.8"]) == 2
    err = capsys.readouterr().err
    assert "was made with knobs {'lucky': 0.5, 'long': False, 'systematic': 0.0}" in err and "drop --lucky" in err
    assert not (out / "task").exists()
    # the response budget follows the task that runs (an --sft-from run's too), unless --max-response says
    meta = json.loads((src / "task" / "task.json").read_text())
    assert response_budget(None, meta) == 48 and response_budget(None, {"knobs": None}) == 48
    assert response_budget(None, {**meta, "knobs": {**meta["knobs"], "long": True}}) == LONG_RESPONSE
    assert response_budget(64, {"knobs": {"long": True}}) == 64
    # the long task's tokenizer outgrows the preset's 512 rows, and its micro-batches go by a token budget
    assert task_flags(None, meta) == [] and task_flags(2048, meta) == ["--max-tokens-per-microbatch", "2048"]
    long = {"vocab_size": 585, "knobs": {"long": True}}
    assert task_flags(None, long) == ["--vocab-size", "585", "--max-tokens-per-microbatch",
                                      str(LONG_MICROBATCH_TOKENS)]
