import pytest

from vskip_core.evaluation import anls, final_answer, parse_multiple_choice, parse_yes_no, pope_metrics


def test_final_answer():
    assert final_answer("I see red. Answer: red") == "red"
    assert final_answer("so the answer is (B).") == "(B)"
    assert final_answer("Answer: no. Later... Answer: yes") == "yes"
    assert final_answer("no answer line") is None


def test_anls_hand_computed():
    assert anls("$4.57", ["$4.57", "4.57"]) == 1.0
    assert anls("$4.52", ["$4.57"]) == pytest.approx(0.8)  # 1 edit / 5 chars
    assert anls("  THE  Cat ", ["the cat"]) == 1.0  # case and whitespace
    assert anls("$1.00", ["$9.99"]) == 0.0  # distance 3/5 = 0.6 >= 0.5 -> 0
    assert anls("4.57", ["$4.57", "4.57"]) == 1.0 and anls("4.57", ["$4.57"]) == pytest.approx(
        0.8
    )  # best ref
    assert anls(None, ["a"]) == 0.0


def test_parse_multiple_choice_mmmu_rules():
    opts = ["the red circle", "the blue square", "the green diamond", "the yellow star"]
    assert parse_multiple_choice("(B)", opts) == ("B", False)
    assert parse_multiple_choice("I think (A) ... no, (C)", opts) == ("C", False)  # last wins
    assert parse_multiple_choice("B", opts) == ("B", False)
    assert parse_multiple_choice("C. the green diamond", opts) == ("C", False)
    assert parse_multiple_choice("The most expensive object is clearly the blue square", opts) == ("B", False)
    letter, rnd = parse_multiple_choice("no idea", opts, seed=1)
    assert rnd and letter in "ABCD"
    assert parse_multiple_choice("no idea", opts, seed=1) == (letter, True)  # seeded


def test_pope_metrics_uses_predicted_yes_ratio():
    preds = ["yes", "yes", "yes", "no", None]
    labels = ["yes", "no", "yes", "yes", "no"]
    m = pope_metrics(preds, labels)
    assert m["yes_ratio"] == pytest.approx(
        3 / 5
    )  # predictions, not labels (labels would give 3/5 too: check below)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(2 / 5) and m["unparsed"] == 1
    m2 = pope_metrics(["no"] * 4, ["yes", "yes", "no", "no"])
    assert m2["yes_ratio"] == 0.0 and m2["f1"] == 0.0


def test_yes_no_from_cot():
    assert parse_yes_no("The red square is there, not blue... Answer: yes") == "yes"
    assert parse_yes_no("Is there a yes? There is no blue one. Answer: no") == "no"
