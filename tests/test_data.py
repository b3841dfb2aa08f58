import collections

import pytest

from vskip_core.config import Config
from vskip_core.data.embedded import (
    ANCHOR_TYPES,
    COLOURS,
    SHAPES,
    build_split,
    decode_record,
    image_bytes,
    make_example,
    popular_categories,
)


@pytest.fixture(scope="module")
def cfg():
    return Config()


def test_same_seed_same_bytes(cfg):
    for i in (0, 1, 7, 123):
        a, b = make_example(cfg, "test", i), make_example(cfg, "test", i)
        assert image_bytes(a["image"]) == image_bytes(b["image"])
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}


def test_splits_differ(cfg):
    a, b = make_example(cfg, "train", 5), make_example(cfg, "test", 5)
    assert image_bytes(a["image"]) != image_bytes(b["image"]) or a["question"] != b["question"]


def test_other_seed_changes_data():
    a = make_example(Config(), "test", 3)
    c = Config()
    c.data.seed += 1
    assert a["rationale"] != make_example(c, "test", 3)["rationale"]


def test_anchor_spans_match_text_and_scene(cfg):
    for i in range(200):
        ex = make_example(cfg, "train", i)
        assert ex["anchors"], ex["id"]
        objs = ex["scene"]["objects"]
        for a in ex["anchors"]:
            assert ex["rationale"][a["start"] : a["end"]] == a["value"]
            assert a["type"] in ANCHOR_TYPES
            if a["type"] == "text":
                assert a["value"] in {o["price"] for o in objs}
        # the gold rationale ends with the answer line
        assert ex["rationale"].endswith(f"Answer: {ex['answer']}")


def test_scene_constraints(cfg):
    for i in range(200):
        objs = make_example(cfg, "val", i)["scene"]["objects"]
        assert cfg.data.min_objects <= len(objs) <= cfg.data.max_objects
        assert len({o["shape"] for o in objs}) == len(objs)
        assert len({o["cell"] for o in objs}) == len(objs)
        assert len({o["price"][1] for o in objs}) == len(objs)  # distinct dollar digits


def test_families_balanced_and_answers_valid(cfg):
    exs = [make_example(cfg, "train", i) for i in range(400)]
    assert collections.Counter(e["family"] for e in exs) == {f: 100 for f in cfg.data.families}
    for e in exs:
        if e["family"] == "multistep":
            assert e["answer"] in "ABCD" and len(e["options"]) == 4 and len(set(e["options"])) == 4
        if e["family"] == "attribute":
            assert e["answer"] in list(COLOURS) + list(SHAPES) + ["small", "large"]


def test_pope_negative_sampling(cfg):
    exs = [make_example(cfg, "train", i, family="existence") for i in range(1200)]
    yes = sum(e["answer"] == "yes" for e in exs)
    assert abs(yes / len(exs) - 0.5) < 0.05
    by_split = collections.Counter(e["pope_split"] for e in exs)
    assert set(by_split) == {"random", "popular", "adversarial"}
    assert min(by_split.values()) > 300
    popular = popular_categories(cfg.data)
    for e in exs:
        present = {(o["colour"], o["shape"]) for o in e["scene"]["objects"]}
        asked = next((c, s) for c in COLOURS for s in SHAPES if f" {c} {s}" in e["question"])
        assert (asked in present) == (e["answer"] == "yes")
        if e["answer"] == "no" and e["pope_split"] == "adversarial":
            assert any(asked[0] == c or asked[1] == s for c, s in present)
        if e["answer"] == "no" and e["pope_split"] == "popular":
            assert asked == next(k for k in popular if k not in present)
    for split in ("random", "popular", "adversarial"):
        sub = [e for e in exs if e["pope_split"] == split]
        assert abs(sum(e["answer"] == "yes" for e in sub) / len(sub) - 0.5) < 0.08


def test_dataset_schema(cfg):
    ds = build_split(cfg.data, "test", 8)
    assert ds.features["image"].__class__.__name__ == "Image"
    row = decode_record(ds[3])
    ref = make_example(cfg, "test", 3)
    assert row["rationale"] == ref["rationale"] and row["anchors"] == ref["anchors"]
    assert row["decisions"] == ref["decisions"]
    assert row["image"].size == (cfg.data.image_size, cfg.data.image_size)


def test_find_anchors_recovers_gold_anchors(cfg):
    from vskip_core.data.embedded import find_anchors

    for i in range(100):
        ex = make_example(cfg, "test", i)
        found = find_anchors(ex["rationale"], ex["scene"])
        gold = {(a["type"], a["start"], a["end"]) for a in ex["anchors"]}
        assert gold <= {(a["type"], a["start"], a["end"]) for a in found}
    wrong = find_anchors("There is a purple star and a $9.99 label.", ex["scene"])
    assert [a["type"] for a in wrong] == ["colour", "text"]


def test_lookup_drills_state_the_asked_objects_attributes(smoke_cfg):
    from vskip_core.data.embedded import make_lookup_drill

    drills = [make_lookup_drill(smoke_cfg, "teacher", i) for i in range(60)]
    assert len({d["id"] for d in drills}) == 60
    negatives = 0
    for d in drills:
        for a in d["anchors"]:
            assert d["rationale"][a["start"] : a["end"]] == a["value"]
        shape = d["question"].removesuffix(".").split()[-1]
        objs = {o["shape"]: o for o in d["scene"]["objects"]}
        if d["rationale"].startswith("There is no"):
            negatives += 1
            assert shape not in objs
        elif shape != "object":  # "Describe the triangle." / "... the red triangle."
            o = objs[shape]
            assert (
                f"{o['size']} {o['colour']} {o['shape']}" in d["rationale"] and o["price"] in d["rationale"]
            )
    assert 5 <= negatives <= 25  # a quarter are absent shapes
    # the drills' scenes are their own stream, not the teacher split's examples
    assert drills[0]["scene"] != make_example(smoke_cfg, "teacher", 0)["scene"]


def test_compare_drills_are_balanced_and_blank(smoke_cfg):
    from vskip_core.data.embedded import BACKGROUND, make_compare_drill

    drills = [make_compare_drill(smoke_cfg, "teacher", i) for i in range(400)]
    assert len({d["id"] for d in drills}) == 400
    same = 0
    for d in drills:
        found, need = (a["value"] for a in d["anchors"])
        verdict = d["decisions"][0]["value"]
        assert d["rationale"] == f"It is {found}; we need {need}: {verdict}."
        assert verdict == ("same" if found == need else "different")
        same += verdict == "same"
        assert d["loss_on"] == "decisions" and d["scene"]["objects"] == []
    assert 160 <= same <= 240  # half are "same"
    assert set(drills[0]["image"].getdata()) == {BACKGROUND}  # nothing to see: the verdict is text-only


def test_existence_rationale_puts_found_and_asked_colour_side_by_side(cfg):
    for i in range(200):
        e = make_example(cfg, "test", i, family="existence")
        for d in e["decisions"]:
            assert e["rationale"][d["start"] : d["end"]] == d["value"]
        verdicts = [d["value"] for d in e["decisions"]]
        if "There is no" in verdicts:
            assert e["answer"] == "no" and verdicts == ["There is no"]
            continue
        found, asked = [a["value"] for a in e["anchors"] if a["type"] == "colour"][-2:]
        assert f"It is {found}; we need {asked}: " in e["rationale"]
        assert verdicts == ["same" if e["answer"] == "yes" else "different"]
        assert (found == asked) == (e["answer"] == "yes")


def _multistep_example(cfg, want, style="local"):
    import dataclasses

    from vskip_core.data.embedded import make_example

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, multistep_rationale=style))
    for i in range(400):
        ex = make_example(cfg, "test", i, family="multistep")
        if want(ex):
            return ex
    raise AssertionError("no such example in 400")


def test_local_multistep_rationale_checks_each_option_and_compares_two_digits_at_a_time(cfg):
    from vskip_core.metrics import multistep_steps

    ex = _multistep_example(cfg, lambda e: "different" in e["rationale"] and "there is no" in e["rationale"])
    rows = multistep_steps(ex["rationale"], ex["scene"], "most" in ex["question"])
    assert {r["option"] for r in rows} == {"A", "B", "C", "D"} and all(r["ok"] for r in rows)
    present = {(o["colour"], o["shape"]) for o in ex["scene"]["objects"]}
    n_present = sum(tuple(o.split()[1:]) in present for o in ex["options"])
    assert (
        sum(r["step"] == "compare" for r in rows) == n_present - 1
    )  # one comparison per price after the first
    assert ex["rationale"].endswith(f"the answer is {ex['answer']}. Answer: {ex['answer']}")
    said = [ex["rationale"][d["start"] : d["end"]] for d in ex["decisions"]]
    assert (
        "different" in said and "there is no" in said and ex["answer"] in said
    )  # the teacher's loss weights


def test_scan_multistep_rationale_scans_dollar_digits_to_the_first_price_written(cfg):
    from vskip_core.metrics import multistep_steps

    ex = _multistep_example(
        cfg, lambda e: ": none" in e["rationale"] and "different" in e["rationale"], "scan"
    )
    most = "most" in ex["question"]
    rows = multistep_steps(ex["rationale"], ex["scene"], most)
    assert all(r["ok"] for r in rows)
    present = {(o["colour"], o["shape"]): o["price"] for o in ex["scene"]["objects"]}
    prices = [present[tuple(o.split()[1:])] for o in ex["options"] if tuple(o.split()[1:]) in present]
    best = (max if most else min)(prices, key=lambda p: float(p[1:]))
    misses = [r["claim"] for r in rows if r["step"] == "scan"]
    start = 9 if most else 1
    assert misses == [f"${d}: none" for d in range(start, int(best[1]), -1 if most else 1)]
    assert [r["claim"] for r in rows if r["step"] == "compare"] == [best]
    said = [ex["rationale"][d["start"] : d["end"]] for d in ex["decisions"]]
    assert said[-2:] == [best[2:], ex["answer"]] and ": none" in said
    other = next(p for p in prices if p != best)
    head, _, tail = ex["rationale"].rpartition(f"{best} for (")  # the scan's hit, not the option's line
    wrong = f"{head}{other} for ({tail}"
    bad = {r["step"] for r in multistep_steps(wrong, ex["scene"], most) if not r["ok"]}
    assert bad == {"compare"}  # the letter still names the right option


def test_image_multistep_rationale_names_the_extreme_object_then_its_letter(cfg):
    from vskip_core.metrics import multistep_steps
    from vskip_core.teacher import token_labels

    ex = _multistep_example(cfg, lambda e: len(e["scene"]["objects"]) >= 3, "image")
    most = "most" in ex["question"]
    rows = multistep_steps(ex["rationale"], ex["scene"], most, ex["options"])
    assert [r["step"] for r in rows] == ["compare", "price", "leader"] and all(r["ok"] for r in rows)
    price = {o["price"]: o for o in ex["scene"]["objects"]}
    best = (max if most else min)(price, key=lambda p: float(p[1:]))
    other = next(p for p in price if p != best)
    o, x = price[best], price[other]
    wrong = ex["rationale"].replace(
        f"the {o['colour']} {o['shape']}, with", f"the {x['colour']} {x['shape']}, with"
    )
    assert {r["step"] for r in multistep_steps(wrong, ex["scene"], most, ex["options"]) if not r["ok"]} == {
        "compare",
        "price",
        "leader",
    }
    rank = token_labels(ex["scene"], cfg.data.image_size, rank=True)["rank"]
    assert set(rank.tolist()) == {0, 1, 2, 3} - ({0} if len(ex["scene"]["objects"]) == 4 else set())
    assert "rank" not in token_labels(ex["scene"], cfg.data.image_size)  # other designs: labels unchanged


def test_pick_multistep_rationale_goes_through_the_options_until_the_object_found(cfg):
    from vskip_core.metrics import multistep_steps

    ex = _multistep_example(cfg, lambda e: e["answer"] in "CD", "pick")
    most = "most" in ex["question"]
    rows = multistep_steps(ex["rationale"], ex["scene"], most, ex["options"])
    picks = [r["claim"] for r in rows if r["step"] == "pick"]
    assert picks == ["no"] * "ABCD".index(ex["answer"]) + ["yes"] and all(r["ok"] for r in rows)
    wrong = ex["rationale"].replace(": no.", ": yes.", 1)
    bad = {r["step"] for r in multistep_steps(wrong, ex["scene"], most, ex["options"]) if not r["ok"]}
    assert bad == {"pick", "leader"}  # a wrong "yes" comes first, so its letter is taken


def test_rank_multistep_rationale_asks_each_present_option_whether_it_is_the_extreme_one(cfg):
    from vskip_core.metrics import facts_right, multistep_steps

    ex = _multistep_example(cfg, lambda e: e["answer"] in "CD" and ": same; " in e["rationale"], "rank")
    most = "most" in ex["question"]
    rows = multistep_steps(ex["rationale"], ex["scene"], most, ex["options"])
    assert all(r["ok"] for r in rows) and facts_right(rows)
    assert rows[-1] == {"option": ex["answer"], "step": "leader", "claim": f"({ex['answer']})", "ok": True}
    ranks = [r["claim"].rsplit(" ", 1)[1] for r in rows if r["step"] == "rank"]
    assert ranks[-1] == "yes" and set(ranks[:-1]) <= {"no"}  # read in order until the first yes
    said = [ex["rationale"][d["start"] : d["end"]] for d in ex["decisions"]]
    assert said[-2:] == ["same", "yes"]  # the decisions the teacher weights
    wrong = ex["rationale"].replace("? yes.", "? no.")
    bad = {r["step"] for r in multistep_steps(wrong, ex["scene"], most, ex["options"]) if not r["ok"]}
    assert bad == {"rank"}  # no yes, so no letter is taken


def test_verify_multistep_rationale_checks_each_option_then_compares_it_with_the_object_found(cfg):
    from vskip_core.metrics import facts_right, multistep_steps

    ex = _multistep_example(
        cfg, lambda e: e["answer"] in "CD" and ": same; " in e["rationale"].split("(C)")[0], "verify"
    )
    most = "most" in ex["question"]
    rows = multistep_steps(ex["rationale"], ex["scene"], most, ex["options"])
    assert all(r["ok"] for r in rows) and facts_right(rows)
    assert {"look-up", "verdict", "pick", "compare", "price", "leader"} <= {r["step"] for r in rows}
    picks = [r["claim"].rsplit(" ", 1)[1] for r in rows if r["step"] == "pick"]
    assert picks[-1] == "yes" and set(picks[:-1]) == {"no"}
    wrong = ex["rationale"].replace("? no.", "? yes.", 1)
    bad = {r["step"] for r in multistep_steps(wrong, ex["scene"], most, ex["options"]) if not r["ok"]}
    assert bad == {"pick", "leader"}  # a wrong yes comes first, so its letter is taken


@pytest.mark.parametrize("style", ["list", "local", "scan"])
def test_multistep_steps_flag_a_misread_price_and_colour(cfg, style):
    from vskip_core.metrics import facts_right, multistep_report, multistep_steps

    ex = _multistep_example(cfg, lambda e: e["rationale"].count("$") >= 2, style)
    most = "most" in ex["question"]
    rows = multistep_steps(ex["rationale"], ex["scene"], most)
    assert rows and all(r["ok"] for r in rows) and facts_right(rows)
    obj = next(o for o in ex["scene"]["objects"] if o["price"] in ex["rationale"])
    misread = ex["rationale"].replace(obj["price"], "$0.00")
    bad = {r["step"] for r in multistep_steps(misread, ex["scene"], most) if not r["ok"]}
    assert "price" in bad
    if style != "list":
        other = next(c for c in ("red", "green", "blue") if c != obj["colour"])
        wrong = ex["rationale"].replace(f"it is {obj['colour']};", f"it is {other};")
        assert "look-up" in {r["step"] for r in multistep_steps(wrong, ex["scene"], most) if not r["ok"]}
    report = multistep_report([ex["rationale"], misread], [ex, ex])
    assert report["n"] == 2 and report["facts_right"] == 0.5


def test_instruction_lists_are_disjoint_and_the_ratio_sentence_is_held_out():
    import re

    from vskip_core.data.embedded import HELDOUT_INSTRUCTIONS, TRAIN_INSTRUCTIONS
    from vskip_core.modeling.prompts import RATIO_TEMPLATE
    from vskip_core.stages.distillation import format_ratio

    assert len(set(TRAIN_INSTRUCTIONS)) == len(TRAIN_INSTRUCTIONS) >= 20
    assert len(set(HELDOUT_INSTRUCTIONS)) == len(HELDOUT_INSTRUCTIONS) >= 10
    assert not set(TRAIN_INSTRUCTIONS) & set(HELDOUT_INSTRUCTIONS)
    assert RATIO_TEMPLATE.format(ratio=format_ratio(0.9)) in HELDOUT_INSTRUCTIONS
    ratio_like = re.compile(r"keep\b.*\d.*of the reasoning", re.I)
    assert not [s for s in TRAIN_INSTRUCTIONS if ratio_like.search(s) or re.search(r"\d", s)]


def test_instruct_variant_direct_targets_and_added_sentences(cfg):
    from vskip_core.data.answers import ANSWER_PREFIX
    from vskip_core.data.embedded import TRAIN_INSTRUCTIONS, instruct_variant

    ex = make_example(cfg, "teacher", 5)
    assert instruct_variant(ex, "5") is ex  # off: the example unchanged
    out = [instruct_variant(make_example(cfg, "teacher", i), str(i), 0.3, 0.5) for i in range(400)]
    assert [instruct_variant(make_example(cfg, "teacher", i), str(i), 0.3, 0.5) for i in range(5)] == out[:5]
    direct = [x for x in out if x.get("direct")]
    assert 0.22 < len(direct) / len(out) < 0.38
    assert all(x["rationale"] == f"{ANSWER_PREFIX} {x['answer']}" and not x["anchors"] for x in direct)
    added = [x.get("instruction") or x.get("prefix", "").rstrip("\n") for x in out]
    added = [s for s in added if s]
    assert 0.4 < len(added) / len(out) < 0.6 and set(added) <= set(TRAIN_INSTRUCTIONS)
    assert 0.3 < sum("prefix" in x for x in out) / len(added) < 0.7  # before and after the question
    assert all(x["prefix"].endswith("\n") for x in out if "prefix" in x)
    # the rest keep their rationale; a drill (no answer) never becomes a direct answer
    assert all(
        x["rationale"] == make_example(cfg, "teacher", i)["rationale"]
        for i, x in enumerate(out)
        if not x.get("direct")
    )
