"""The notebooks' closing readings say what the numbers say: verdicts flip with the figures, and missing
figures (a smoke run: no anchors, no VARR) give a plain sentence instead of an error."""

from vskip_core.infra import readings


def _teacher(multistep: float) -> dict:
    return {
        "teacher": {"attribute": {"accuracy": 0.9}, "multistep": {"accuracy": multistep}},
        "blank_image": {"attribute": {"accuracy": 0.3}, "multistep": {"accuracy": 0.25}},
        "chance": {"attribute": {"accuracy": 0.28}, "multistep": {"accuracy": 0.25}},
        "multistep_check": {"n": 0},
    }


def test_teacher_at_chance_is_named():
    assert "**multistep** accuracy 0.270" in readings.teacher(_teacher(0.27))
    assert "at chance" in readings.teacher(_teacher(0.27)).split("multistep")[1]
    assert "at chance" not in readings.teacher(_teacher(0.8)).split("multistep")[1].split("\n")[0]


def test_teacher_whose_blank_image_scores_as_well_is_named():
    m = _teacher(0.8)
    m["blank_image"]["attribute"]["accuracy"] = 0.88
    assert "blank image scores as well" in readings.teacher(m).split("multistep")[0]


def test_distillation_flags_targets_off_ratio_and_a_loss_that_did_not_fall():
    d = {"per_ratio": {"0.5": {"act_ratio": 0.9}, "0.9": {"act_ratio": 0.88}}}
    m = {"datasets": {"vskip": d}, "methods": {"vskip": {"first_loss": 1.0, "last_loss": 1.2, "steps": 4}}}
    text = readings.distillation(m)
    assert "`vskip` at 0.5" in text and "`vskip` at 0.9" not in text and "the loss did not fall" in text


def _gate(vskip: float, text: float) -> dict:
    row = lambda v: {"0.5": {"varr": {"overall": v}}}  # noqa: E731
    return {"methods": {"vskip": row(vskip), "text_only": row(text)}, "max_abs_ratio_error": 0.001}


def test_gate_verdict_follows_the_figures():
    assert "agrees with the paper" in readings.gate(_gate(0.6, 0.4))
    assert "disagrees with the paper" in readings.gate(_gate(0.4, 0.6))
    assert "text_only beats the union gate" in readings.gate(_gate(0.4, 0.6))
    assert "no clear difference" in readings.gate(_gate(0.5, 0.5))
    assert "was not swept" in readings.gate(_gate(0.5, 0.5), 0.3)
    assert "no VARR at gamma 0.5" in readings.gate(
        {"methods": {"vskip": {"0.5": {"varr": {}}}}, "max_abs_ratio_error": 0}
    )


def _scores(anch: float, surp: float, auc) -> dict:
    s = {"auc_anchor": anch, "auc_by_type": {"colour": auc, "position": 0.4}}
    return {
        "summary": {"anchoring": s, "surprisal": {"auc_anchor": surp, "auc_by_type": {"colour": 0.5}}},
        "layer_auc": {"1/max": 0.52, "2/max": 0.8},
        "key_layers": [1, 2],
        "head_reduce": "max",
    }


def test_scoring_reading():
    text = readings.scoring(_scores(0.6, 0.7, 0.8))
    assert "it does not here" in text and "anchoring beats surprisal on: colour" in text
    assert "position (0.40)" in text and "dilutes" in text
    assert "it does here" in readings.scoring(_scores(0.8, 0.7, None))
    assert "nothing to tell apart" in readings.scoring(_scores(None, 0.7, None))


def test_scoring_reading_names_the_key_layer_choice_and_position():
    m = _scores(0.8, 0.7, 0.8)
    m["layer_choice"] = {
        "rule": "auto: best within-rationale AUC on the held-out rationales",
        "layers": [2, 3],
        "head_reduce": "max",
        "score_layer": 2,
        "n_held_out": 300,
        "n_reported": 900,
        "table": [{"layers": [2, 3], "head_reduce": "max", "auc_within": 0.81}],
    }
    m["position"] = [
        {"layers": "key [2, 3]", "source": "image", "position_share": 0.3, "auc_anchor": 0.72},
        {"layers": "key [2, 3]", "source": "blank image", "position_share": 0.45, "auc_anchor": 0.51},
        {"layers": "key [2, 3]", "source": "image - blank", "position_share": 0.13, "auc_anchor": 0.7},
        {
            "layers": "-",
            "source": "surprisal gain (no image - image)",
            "position_share": 0.1,
            "auc_anchor": 0.75,
        },
    ]
    text = readings.scoring(m)
    assert "key layers [2, 3], max over heads: auto" in text and "AUC 0.810" in text and "other 900" in text
    assert "position explains 0.30" in text and "0.45 of it on a blank image" in text
    assert "surprisal gain from the image (no image minus image): AUC 0.750" in text


def test_gate_reading_gives_the_interval_against_text_only():
    m = _gate(0.8, 0.5)
    m["varr_intervals_at_0.5"] = [
        {"method": "vskip", "type": "colour", "minus_text_only": 0.3, "minus_text_only_ci": [0.2, 0.4]}
    ]
    assert "colour +0.300 [+0.200, +0.400]" in readings.gate(m)
    m["bands_at_0.5"] = [
        {"band": "layer 2", "heads": "max", "method": "vskip", "overall": 0.82},
        {"band": "key [0, 1, 2, 3] (this run)", "heads": "max", "method": "vskip", "overall": 0.79},
        {"band": "layer 2", "heads": "max", "method": "visual_only", "overall": 0.9},
    ]
    assert (
        "best for V-Skip is layer 2, max over heads (0.820) against this run's key layers (0.790)"
        in readings.gate(m)
    )
    m["bands_at_0.5"][0]["overall"] = 0.795
    assert "no key-layer set of the band ablation beats" in readings.gate(m)


def _hall(vskip: float, text: float) -> dict:
    rows = [
        {"method": "full", "ratio": 1.0, "total_per_example": 1.0},
        {"method": "vskip", "ratio": 0.5, "total_per_example": vskip},
        {"method": "text_only", "ratio": 0.5, "total_per_example": text},
    ]
    return {"attribute_hallucinations": rows, "pope_by_split": [], "act_ratio": {"vskip": 0.95}}


def test_hallucination_verdict():
    assert "agrees with the paper (fewer)" in readings.hallucination(_hall(0.5, 1.0))
    assert "disagrees" in readings.hallucination(_hall(1.0, 0.5))
    assert "no clear difference" in readings.hallucination(_hall(1.0, 1.01))
    assert "vskip 0.95 of the teacher's length: vskip barely compresses" in readings.hallucination(
        _hall(1.0, 1.0)
    )


def test_text_gallery_and_kv_table_escape_and_wrap():
    """The HTML helpers the notebooks show text through: markup in the text is escaped (a model may write
    `<b>`), prices stay out of MathJax, every column is a labelled line, a long dict becomes rows of pairs."""
    import pandas as pd

    from vskip_core import plots

    frame = pd.DataFrame(
        [{"id": "t-1", "question": "Price?", "teacher": "It is $5.21 <b>", "vskip @ 0.5": "x"}]
    )
    html = plots.text_gallery(frame, "id", "question").data
    assert "mathjax_ignore" in html and "&lt;b&gt;" in html and "<b>t-1</b> · Price?" in html
    assert html.count("<tr>") == 2 and "overflow-wrap:anywhere" in html and "width:100%" in html
    table = plots.kv_table({f"k{i}": i / 3 for i in range(7)}, cols=3).data
    assert table.count("<tr>") == 3 and "<code>k6</code>" in table and "0.3333" in table


def test_system_label_names_students_by_ratio_only():
    import pandas as pd

    from vskip_core import plots

    frame = pd.DataFrame({"method": ["teacher", "vskip", "full"], "ratio": [None, 0.5, 1.0]})
    assert plots.system_label(frame).tolist() == ["teacher", "vskip@0.5", "full@1"]
