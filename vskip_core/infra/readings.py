"""The closing reading of notebooks 00-04 and 06: a few markdown lines written from the stage's own metrics at
run time (so they cannot go stale), saying what agrees or disagrees with the paper. 05 and 07 end on their
claims (`infra.summary.claims_reading`, `stages.pruning.claims_reading`)."""

from __future__ import annotations

import math
from typing import Any

from vskip_core.infra.summary import ACT_RATIO_TOL
from vskip_core.metrics import FAMILY_SCORE

NEAR_CHANCE = 0.05  # a score within this of chance (or of the blank-image control) reads as "the same"
WEAK_AUC = 0.6  # an anchor-detection AUC below this reads as "near chance" (0.5)
SAME_VARR = 0.01  # VARR differences below this read as "no clear difference" (where a figure has no interval)
SAME_RATE = 0.05  # the same for hallucinations per example (06)


def _head(title: str, lines: list[str]) -> str:
    return "\n".join([f"**What this run says** ({title}):", "", *[f"- {x}" for x in lines]])


def _best(d: dict[str, float]) -> tuple[str, float]:
    k = max(d, key=d.get)
    return k, d[k]


def _steps(ms: dict[str, Any] | None) -> dict[str, Any] | None:
    """`metrics.multistep_report` with its weakest step named, or None when nothing was checked."""
    if not ms or not ms.get("n") or not ms.get("step_accuracy"):
        return None
    step, acc = min(ms["step_accuracy"].items(), key=lambda kv: kv[1])
    return ms | {"weakest": f"`{step}` at {acc:.1%}"}


def teacher(m: dict[str, Any]) -> str:
    """00: per family, the teacher against the blank-image control and chance; the multi-step fact check."""
    lines = []
    for fam, s in sorted(m["teacher"].items()):
        key = FAMILY_SCORE.get(fam, "accuracy")
        v, blank = s.get(key), (m.get("blank_image") or {}).get(fam, {}).get(key)
        c = (m.get("chance") or {}).get(fam, {}).get(key)
        if v is None:
            continue
        words = f"**{fam}** {key} {v:.3f}"
        if blank is not None:
            words += f", blank image {blank:.3f}"
        if c is not None:
            words += f", chance {c:.3f}"
        if c is not None and v - c <= NEAR_CHANCE:
            words += ": **at chance**, its rationales teach nothing to compress"
        elif blank is not None and v - blank <= NEAR_CHANCE:
            words += ": **the blank image scores as well**: the answers do not come from the image"
        elif blank is not None and c is not None and blank - c > NEAR_CHANCE:
            words += f": it reads the image; the blank image stays {blank - c:+.3f} above chance (guessable in part"
            words += " from the question)"
        else:
            words += ": it reads the image"
        lines.append(words)
    ms = _steps(m.get("multistep_check"))
    if ms:
        lines.append(
            f"multi-step: every fact read off the image right in {ms['facts_right']:.1%} of {ms['n']} rationales"
            + (
                f"; the weakest step is {ms['weakest']}: answers can be right for partly wrong reasons"
                if ms["facts_right"] < 1
                else ""
            )
        )
    lines.append(
        "V-Skip compresses a competent teacher's rationales; a family at chance or without a grounded "
        "rationale cannot show visual amnesia, whatever the gate does."
    )
    return _head("the teacher", lines)


def generation(m: dict[str, Any]) -> str:
    """01: what reaches distillation, per family, and how sound the kept multi-step rationales are."""
    lines = [
        f"{m['n_kept']} of {m['n_generated']} rationales kept ({m['n_kept'] / max(m['n_generated'], 1):.0%})"
    ]
    for fam, f in sorted(m["per_family"].items()):
        share = f["kept"] / max(f["generated"], 1)
        note = ": **under-represented** in the students' data" if share < 0.5 else ""
        lines.append(
            f"{fam}: {f['kept']} of {f['generated']} kept (teacher accuracy {f['accuracy']:.1%}){note}"
        )
    ms = _steps(m.get("multistep_kept_check"))
    if ms and ms["facts_right"] < 1:
        why = (
            "although the answer is right: the filter keeps right answers, not right reasoning"
            if m.get("keep") == "correct"
            else f"(`generation.keep: {m.get('keep')}` keeps rationales whatever their answer)"
        )
        lines.append(
            f"of the {ms['n']} kept multi-step rationales, {1 - ms['facts_right']:.1%} state a wrong fact "
            f"(weakest step {ms['weakest']}) {why}; the students learn these too"
        )
    if m.get("n_anchors"):
        lines.append(
            f"{m['anchors_not_in_scene']} of {m['n_anchors']} anchor mentions name a value absent from the scene "
            "(the teacher's own attribute hallucinations, in its kept and dropped rationales)"
        )
    return _head("the teacher's rationales", lines)


def scoring(m: dict[str, Any]) -> str:
    """02: does each path tell visual-anchor tokens from the rest, and which key layers carry the signal."""
    s = m["summary"]
    a, t = s["anchoring"]["auc_anchor"], s["surprisal"]["auc_anchor"]
    if a is None or t is None or a != a or t != t:
        return _head("the two scores", ["no anchor tokens among the scored ones: nothing to tell apart"])
    lines = [
        f"anchor tokens vs the rest, AUC: anchoring {a:.3f}, surprisal {t:.3f}. The paper's premise is that "
        + (
            "the visual path finds anchors surprisal misses: it does here overall"
            if a > t
            else "the visual path finds anchors surprisal misses: overall **it does not here** (surprisal alone "
            "separates them as well or better)"
        )
    ]
    by_a, by_t = s["anchoring"]["auc_by_type"], s["surprisal"]["auc_by_type"]
    by_a = {k: v for k, v in by_a.items() if v is not None and v == v}  # types never mentioned have no AUC
    wins = [k for k in by_a if by_t.get(k) is not None and by_a[k] > by_t[k]]
    weak = [f"{k} ({by_a[k]:.2f})" for k in by_a if by_a[k] < WEAK_AUC]
    if wins:
        lines.append(
            f"anchoring beats surprisal on: {', '.join(wins)} (where the union gate can add to the text path)"
        )
    if weak:
        lines.append(f"anchoring is near or below chance on: {', '.join(weak)}")
    layers = {k: v for k, v in m.get("layer_auc", {}).items() if k.endswith(f"/{m['head_reduce']}") and v}
    if layers:
        key = [
            f"{k.split('/')[0]} ({v:.2f})"
            for k, v in layers.items()
            if int(k.split("/")[0]) in m["key_layers"]
        ]
        best, auc = _best(layers)
        lines.append(
            f"key layers {', '.join(key)}; the best single layer is {best.split('/')[0]} ({auc:.2f})"
            + (
                "; a key layer near chance dilutes the average (stage 03 ablates the band)"
                if any(layers[k] < WEAK_AUC for k in layers if int(k.split("/")[0]) in m["key_layers"])
                else ""
            )
        )
    lines += _layer_choice_lines(m)
    return _head("the two scores", lines)


def _layer_choice_lines(m: dict[str, Any]) -> list[str]:
    """02: how the key layers were chosen, and how much of their anchoring is position."""
    out = []
    c = m.get("layer_choice")
    if c:
        chosen = next(
            (t for t in c["table"] if t["layers"] == c["layers"] and t["head_reduce"] == c["head_reduce"]),
            None,
        )
        auc_ = chosen["auc_within"] if chosen else None
        score = (
            f", within-rationale AUC {auc_:.3f}" if isinstance(auc_, float) and math.isfinite(auc_) else ""
        )
        held = (
            f"{c['n_held_out']} rationales held out{score}; stage 03 reports on the other {c['n_reported']}"
            if c["n_held_out"]
            else "no rationale held out: stage 03 reports on all"
        )
        out.append(
            f"key layers {c['layers']}, {c['head_reduce']} over heads: {c['rule']} ({held}); "
            f"DSTP / RVIS score layer: {c['score_layer']}"
        )
    key = [r for r in m.get("position", []) if str(r["layers"]).startswith("key")]
    by = {r["source"]: r for r in key}
    if "image" in by and "blank image" in by:
        out.append(
            f"position explains {by['image']['position_share']:.2f} of the key layers' anchoring and "
            f"{by['blank image']['position_share']:.2f} of it on a blank image; the position-free difference "
            f"marks visual-attribute tokens with AUC {by['image - blank']['auc_anchor']:.3f} "
            f"(anchoring {by['image']['auc_anchor']:.3f})"
        )
    gain = [r for r in m.get("position", []) if r["source"].startswith("surprisal gain")]
    if gain:
        out.append(f"surprisal gain from the image (no image minus image): AUC {gain[0]['auc_anchor']:.3f}")
    return out


def gate(m: dict[str, Any], gamma: float = 0.5) -> str:
    """03: VARR at gamma for V-Skip against the blind text-only gate and the visual path alone."""
    g = f"{gamma:g}"
    if g not in m["methods"].get("vskip", {}):
        return _head("the gate", [f"gamma {g} was not swept for V-Skip (`gate.gammas`, `gate.methods`)"])
    varr = {k: v[g]["varr"].get("overall") for k, v in m["methods"].items() if g in v}
    varr = {k: x for k, x in varr.items() if x is not None and x == x}  # no mentions, no VARR
    if "vskip" not in varr:
        return _head("the gate", [f"no VARR at gamma {g}: the rationales mention no visual attribute"])
    v = varr["vskip"]
    lines = [
        "VARR overall (the paper's: colour, shape, object category) at gamma "
        + g
        + ": "
        + ", ".join(f"{k} {x:.3f}" for k, x in sorted(varr.items(), key=lambda kv: -kv[1]))
    ]
    for base in ("text_only", "llmlingua2"):
        if base not in varr:
            continue
        d = v - varr[base]
        lines.append(
            f"V-Skip vs the blind {'text-only gate' if base == 'text_only' else 'LLMLingua-2 gate'}: {d:+.3f}: "
            + (
                f"no clear difference (under {SAME_VARR})"
                if abs(d) < SAME_VARR
                else ("keeps more visual attributes: agrees with the paper" if d > 0 else "**keeps fewer**: "
                      "disagrees with the paper")
            )
        )  # fmt: skip
    iv = [
        r
        for r in m.get("varr_intervals_at_0.5", [])
        if r["method"] == "vskip" and r.get("minus_text_only_ci")
    ]
    if g == "0.5" and iv:
        parts = [
            f"{r['type']} {r['minus_text_only']:+.3f} [{r['minus_text_only_ci'][0]:+.3f}, {r['minus_text_only_ci'][1]:+.3f}]"
            for r in iv
            if r["minus_text_only_ci"][0] is not None
        ]
        lines.append("V-Skip minus text-only by type, 95% interval over rationales: " + ", ".join(parts))
    better = [k for k in varr if k != "vskip" and varr[k] - v >= SAME_VARR]
    if better:
        why = (
            ": at a fixed budget the union spends part of it (`gate.text_share`) on the text path, whose picks VARR "
            "does not reward; VARR is one of the two things the gate must keep, the other (the answer) is measured "
            "in 05"
            if set(better) <= {"visual_only", "intersection", "weighted"}
            else ""
        )
        lines.append(f"{', '.join(better)} beat{'s' if len(better) == 1 else ''} the union gate here{why}")
    lines += _band_lines(m)
    lines.append(
        f"largest |actual ratio - gamma|: {m['max_abs_ratio_error']:.4f} (every method at the same budget)"
    )
    return _head("the gate", lines)


def _band_lines(m: dict[str, Any]) -> list[str]:
    """03: the band ablation's best key-layer set for V-Skip against this run's, and why the run keeps its own."""
    rows = [r for r in m.get("bands_at_0.5", []) if r["method"] == "vskip" and r.get("overall") is not None]
    mine = [r for r in rows if "(this run)" in r["band"]]
    if not rows or not mine:
        return []
    best, own = max(rows, key=lambda r: r["overall"]), max(mine, key=lambda r: r["overall"])
    if best["overall"] - own["overall"] < SAME_VARR:
        return [
            f"no key-layer set of the band ablation beats this run's ({own['overall']:.3f}) by {SAME_VARR} or more"
        ]
    return [
        f"the band ablation's best for V-Skip is {best['band']}, {best['heads']} over heads ({best['overall']:.3f}) "
        f"against this run's key layers ({own['overall']:.3f}): the key layers are chosen in stage 02 by how well "
        "anchoring separates attribute words on held-out rationales, not by this table's VARR, which is measured "
        "on the rationales reported here (choosing by it would choose on the data reported)"
    ]


def distillation(m: dict[str, Any]) -> str:
    """04: the students' targets compress as asked and the training loss falls; whether the students then
    write short rationales is 05's ActRatio."""
    lines, off = [], []
    for method, d in m["datasets"].items():
        per = d.get("per_ratio") or {}
        pairs = ", ".join(f"{r} -> {x['act_ratio']:.2f}" for r, x in sorted(per.items()))
        off += [
            f"`{method}` at {r}" for r, x in per.items() if abs(x["act_ratio"] - float(r)) > ACT_RATIO_TOL
        ]
        if pairs:
            lines.append(f"`{method}` targets, asked ratio -> kept fraction: {pairs}")
    lines.append(
        f"**targets off the asked ratio by more than {ACT_RATIO_TOL}**: {', '.join(off)}"
        if off
        else f"every target set keeps the asked fraction within {ACT_RATIO_TOL}"
    )
    for method, r in m["methods"].items():
        fell = "" if r["last_loss"] < r["first_loss"] else ": **the loss did not fall**"
        lines.append(
            f"`{method}` loss {r['first_loss']:.2f} -> {r['last_loss']:.2f} over {r['steps']} steps{fell}"
        )
    lines.append(
        "whether the students learned to write short rationales is measured in 05 (ActRatio per requested ratio, "
        "the paper's central student-level claim)"
    )
    return _head("the students' training", lines)


def hallucination(m: dict[str, Any], ratio: float = 0.5) -> str:
    """06: POPE F1 and attribute hallucinations per student against the full control and the text-only one."""

    def at_ratio(r: dict[str, Any]) -> bool:
        return r["ratio"] is not None and abs(r["ratio"] - ratio) < 1e-9

    lines = []
    hall = m["attribute_hallucinations"]
    full = [r for r in hall if r["method"] == "full"]
    ref = f"full control {full[0]['total_per_example']:.2f}" if full else "no full control"
    per = {
        r["method"]: r["total_per_example"]
        for r in hall
        if at_ratio(r) and r["total_per_example"] is not None
    }
    if per:
        lines.append(
            f"attribute hallucinations per example at ratio {ratio:g}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: kv[1]))
            + f" ({ref})"
        )
    if "vskip" in per and "text_only" in per:
        d = per["vskip"] - per["text_only"]
        lines.append(
            f"V-Skip vs text-only: {d:+.2f} per example: "
            + (
                f"no clear difference (under {SAME_RATE} per example)"
                if abs(d) < SAME_RATE
                else ("agrees with the paper (fewer)" if d < 0 else "**disagrees** with the paper (more)")
            )
        )
    pope = m["pope_by_split"]
    drift = {}
    for r in pope:
        if at_ratio(r) and r.get("f1_drift_vs_full") is not None and r["split"] == "adversarial":
            drift[r["method"]] = r["f1_drift_vs_full"]
    if drift:
        lines.append(
            "POPE F1 drift from the full control, adversarial negatives: "
            + ", ".join(f"{k} {v:+.3f}" for k, v in sorted(drift.items()))
        )
    act = {k: v for k, v in (m.get("act_ratio") or {}).items() if v is not None and v == v}
    if act:
        barely = [k for k, v in act.items() if v > 1 - (1 - ratio) / 2]  # nearer to full length than to ratio
        lines.append(
            f"the students asked for {ratio:g} write "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(act.items()))
            + " of the teacher's length"
            + (
                f": {', '.join(sorted(barely))} barely compress{'es' if len(barely) == 1 else ''}, so "
                "their rates test distillation more than compression"
                if barely
                else ""
            )
        )
    lines.append("these are point estimates, without intervals")
    return _head("hallucination", lines)
