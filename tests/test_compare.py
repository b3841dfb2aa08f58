"""Two runs compared figure by figure (vskip_core.infra.compare)."""

import json

from vskip_core.infra import compare


def _run(root, rows, scores):
    (root / "05_evaluation").mkdir(parents=True)
    (root / "07_visual_token_pruning").mkdir(parents=True)
    (root / "05_evaluation" / "metrics.json").write_text(json.dumps({"rows": rows}))
    (root / "07_visual_token_pruning" / "metrics.json").write_text(json.dumps({"scores": scores}))
    return root


def test_pairs_figures_with_their_intervals_and_keeps_times_apart(tmp_path, capsys):
    a = _run(
        tmp_path / "a",
        [
            {
                "method": "vskip",
                "ratio": 0.5,
                "accuracy_mean": 0.50,
                "accuracy_mean_ci": [0.45, 0.55],
                "latency_s": 1.0,
            }
        ],
        {"fastv": {"0.333": {"score": {"reading": 0.60}, "score_ci": {"reading": [0.55, 0.65]}}}},
    )
    b = _run(
        tmp_path / "b",
        [
            {
                "method": "vskip",
                "ratio": 0.5,
                "accuracy_mean": 0.53,
                "accuracy_mean_ci": [0.0, 1.0],
                "latency_s": 2.0,
            }
        ],
        {"fastv": {"0.333": {"score": {"reading": 0.70}, "score_ci": {"reading": [0.6, 0.8]}}}},
    )
    figs = {f.path: f for f in compare.compare_runs(a, b)}
    acc = figs["rows/vskip@0.5/accuracy_mean"]
    assert acc.ci == (0.45, 0.55) and acc.inside  # the first run's interval, not the second's
    reading = figs["scores/fastv/0.333/score/reading"]
    assert reading.ci == (0.55, 0.65) and reading.inside is False
    assert figs["rows/vskip@0.5/latency_s"].timing
    assert compare.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| 07_visual_token_pruning | 1 | 0 | 1 | 0 / 1 | 0 |" in out
    assert "scores/fastv/0.333/score/reading | 0.6 | 0.7 | [0.55, 0.65]" in out
    assert compare.main([str(a), str(tmp_path / "missing")]) == 2
