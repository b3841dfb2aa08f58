"""Two runs compared figure by figure (vskip_core.infra.compare)."""

import json

from vskip_core.infra import compare


def _run(root, acc, acc_ci, latency, reading, reading_ci):
    """A run folder with one stage-05 row (V-Skip at 0.5) and one stage-07 score (FastV at 33.3%, reading)."""
    row = {
        "method": "vskip",
        "ratio": 0.5,
        "accuracy_mean": acc,
        "accuracy_mean_ci": acc_ci,
        "latency_s": latency,
    }
    scores = {"fastv": {"0.333": {"score": {"reading": reading}, "score_ci": {"reading": reading_ci}}}}
    for stage, metrics in (
        ("05_evaluation", {"rows": [row]}),
        ("07_visual_token_pruning", {"scores": scores}),
    ):
        (root / stage).mkdir(parents=True)
        (root / stage / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_pairs_figures_with_their_intervals_and_keeps_times_apart(tmp_path, capsys):
    a = _run(tmp_path / "a", 0.50, [0.45, 0.55], 1.0, 0.60, [0.55, 0.65])
    b = _run(tmp_path / "b", 0.53, [0.0, 1.0], 2.0, 0.70, [0.6, 0.8])
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
