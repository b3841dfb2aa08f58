"""The words the paper's VARR counts (colour, shape, object category), for real rationales and embedded ones alike:
basic colour terms, shape words, and COCO's 80 object categories with plurals and common synonyms (the words
POPE's questions use). Each lexicon maps a surface form to its canonical value; `metrics.attribute_mentions`
reads them."""

from __future__ import annotations

import re


def _forms(table: dict[str, list[str]]) -> dict[str, str]:
    """{surface form: canonical value} from {canonical: [other forms]}; the canonical form maps to itself."""
    out: dict[str, str] = {}
    for canon, others in table.items():
        for form in [canon, *others]:
            out[form] = canon
    return out


# Berlin & Kay's eleven basic colour terms and common secondary ones, British and American spellings ("tan" is
# left out: MMMU's trigonometry writes it).
COLOUR_TERMS = _forms(
    {
        "red": [], "orange": [], "yellow": [], "green": [], "blue": [], "purple": ["violet"],
        "pink": [], "brown": [], "black": [], "white": [], "grey": ["gray"],
        "beige": [], "cyan": [], "magenta": [], "maroon": [], "navy": [], "teal": [], "turquoise": [],
        "gold": ["golden"], "silver": [], "olive": [], "lavender": [],
    }
)  # fmt: skip

# Plane and solid shapes, their plurals and adjectives ("a round table" names a circle's shape).
SHAPE_TERMS = _forms(
    {
        "circle": ["circles", "circular", "round"], "square": ["squares"],
        "triangle": ["triangles", "triangular"], "rectangle": ["rectangles", "rectangular"],
        "diamond": ["diamonds", "rhombus"], "oval": ["ovals", "ellipse", "elliptical"],
        "star": ["stars"], "hexagon": ["hexagons", "hexagonal"], "pentagon": ["pentagons", "pentagonal"],
        "octagon": ["octagons", "octagonal"], "heart": ["hearts"], "cross": ["crosses"],
        "arrow": ["arrows"], "cube": ["cubes"], "sphere": ["spheres", "spherical"],
        "cylinder": ["cylinders", "cylindrical"], "cone": ["cones"], "pyramid": ["pyramids"],
    }
)  # fmt: skip

# COCO's 80 categories (canonical = COCO's name) with plurals and the synonyms captions and POPE questions use.
CATEGORY_TERMS = _forms(
    {
        "person": ["people", "persons", "man", "men", "woman", "women", "boy", "boys", "girl", "girls",
                   "child", "children", "kid", "kids", "player", "players", "pedestrian", "pedestrians"],
        "bicycle": ["bicycles", "bike", "bikes"], "car": ["cars"],
        "motorcycle": ["motorcycles", "motorbike", "motorbikes"],
        "airplane": ["airplanes", "aeroplane", "aeroplanes", "plane", "planes", "aircraft", "jet", "jets"],
        "bus": ["buses"], "train": ["trains"], "truck": ["trucks", "lorry", "lorries"],
        "boat": ["boats", "ship", "ships"], "traffic light": ["traffic lights", "stoplight", "stoplights"],
        "fire hydrant": ["fire hydrants", "hydrant", "hydrants"], "stop sign": ["stop signs"],
        "parking meter": ["parking meters"], "bench": ["benches"], "bird": ["birds"],
        "cat": ["cats", "kitten", "kittens"], "dog": ["dogs", "puppy", "puppies"], "horse": ["horses"],
        "sheep": [], "cow": ["cows", "cattle"], "elephant": ["elephants"], "bear": ["bears"],
        "zebra": ["zebras"], "giraffe": ["giraffes"], "backpack": ["backpacks", "rucksack"],
        "umbrella": ["umbrellas"], "handbag": ["handbags", "purse", "purses"], "tie": ["ties", "necktie"],
        "suitcase": ["suitcases", "luggage"], "frisbee": ["frisbees"], "skis": ["ski"],
        "snowboard": ["snowboards"], "sports ball": ["ball", "balls", "football", "soccer ball"],
        "kite": ["kites"], "baseball bat": ["baseball bats", "bat"],
        "baseball glove": ["baseball gloves", "glove", "mitt"], "skateboard": ["skateboards"],
        "surfboard": ["surfboards"], "tennis racket": ["tennis rackets", "racket", "rackets", "racquet"],
        "bottle": ["bottles"], "wine glass": ["wine glasses"], "cup": ["cups", "mug", "mugs"],
        "fork": ["forks"], "knife": ["knives"], "spoon": ["spoons"], "bowl": ["bowls"],
        "banana": ["bananas"], "apple": ["apples"], "sandwich": ["sandwiches"], "orange": ["oranges"],
        "broccoli": [], "carrot": ["carrots"], "hot dog": ["hot dogs", "hotdog", "hotdogs"],
        "pizza": ["pizzas"], "donut": ["donuts", "doughnut", "doughnuts"], "cake": ["cakes"],
        "chair": ["chairs"], "couch": ["couches", "sofa", "sofas"],
        "potted plant": ["potted plants", "plant", "plants", "houseplant"], "bed": ["beds"],
        "dining table": ["dining tables", "table", "tables"], "toilet": ["toilets"],
        "tv": ["tvs", "television", "televisions", "tv monitor"], "laptop": ["laptops"],
        "mouse": ["mice"], "remote": ["remotes", "remote control"], "keyboard": ["keyboards"],
        "cell phone": ["cell phones", "phone", "phones", "cellphone", "mobile phone", "smartphone"],
        "microwave": ["microwaves"], "oven": ["ovens"], "toaster": ["toasters"], "sink": ["sinks"],
        "refrigerator": ["refrigerators", "fridge", "fridges"], "book": ["books"], "clock": ["clocks"],
        "vase": ["vases"], "scissors": [], "teddy bear": ["teddy bears", "teddy"],
        "hair drier": ["hair driers", "hair dryer", "hair dryers", "hairdryer"],
        "toothbrush": ["toothbrushes"],
    }
)  # fmt: skip

# "orange" alone is read as the colour and "oranges" as the fruit: the one surface form both lexicons hold.
AMBIGUOUS = {"orange": "colour"}

LEXICONS = {"colour": COLOUR_TERMS, "shape": SHAPE_TERMS, "category": CATEGORY_TERMS}
PAPER_VARR_TYPES = tuple(LEXICONS)  # the attribute types the paper's VARR is read by


def _mention_re() -> re.Pattern:
    """One alternation over every surface form, longest first ("stop sign" before "sign"), whole words only."""
    forms = sorted({f for lex in LEXICONS.values() for f in lex}, key=lambda f: (-len(f), f))
    body = "|".join(re.escape(f).replace(r"\ ", r"\s+") for f in forms)
    return re.compile(rf"(?<![A-Za-z])(?:{body})(?![A-Za-z])", re.IGNORECASE)


MENTION_RE = _mention_re()
# "square" as a unit, not a shape: "square root", "square metres", "square feet" ...
UNIT_AFTER_SQUARE = re.compile(
    r"\s+(?:roots?|met(?:er|re)s?|feet|foot|inch(?:es)?|miles?|yards?|units?|km|kilomet|centimet)", re.I
)


def lexicon_type(form: str) -> tuple[str, str]:
    """(type, canonical value) of a matched surface form (whitespace and case normalized)."""
    f = " ".join(form.lower().split())
    if f in AMBIGUOUS:
        t = AMBIGUOUS[f]
        return t, LEXICONS[t][f]
    for t, lex in LEXICONS.items():
        if f in lex:
            return t, lex[f]
    raise KeyError(f"{form!r} is in no lexicon")
