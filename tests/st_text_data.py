"""Natural-language (query, positive) pairs for the drop-in tests and benchmark, built from templates
so that no data set has to be downloaded: facts about made-up places, each with a question, an answer
and near-miss distractors (the same place, another attribute; another place, the same attribute)."""

from __future__ import annotations

import random

PLACES = ["Aldermoor", "Brackenford", "Calloway Reach", "Dunmere", "Eastholt", "Fennick Bay", "Glenvarrow",
          "Harrowgate", "Islington Flats", "Juniper Hollow", "Kestrel Point", "Larkspur", "Marrowdale",
          "Northwick", "Oakhaven", "Pellston", "Quarry Hill", "Redfern", "Saltmarsh", "Thornbury", "Umberleigh",
          "Valecrest", "Westmoor", "Yarrowby", "Zennor Cove", "Ashcombe", "Birchwood", "Coldstream", "Dovecote",
          "Elmstead", "Foxley", "Greyhaven", "Hollowmere", "Ivybridge", "Kingsmead", "Lowther", "Millbrook",
          "Netherby", "Ormsby", "Penhallow"]
ATTRIBUTES = [
    ("population", "How many people live in {p}?", "{p} has a population of about {n} thousand residents."),
    ("founding", "When was {p} founded?", "{p} was founded in the year {y} by river traders."),
    ("industry", "What is the main industry of {p}?", "The economy of {p} is built on {w} and local markets."),
    ("festival", "Which festival is {p} known for?", "Every spring {p} hosts a festival of {f} and music."),
    ("landmark", "What is the most famous landmark in {p}?", "The old {l} of {p} draws visitors all year."),
    ("climate", "What is the weather like in {p}?", "{p} has {c} summers and long, quiet winters."),
    ("food", "What dish is {p} famous for?", "Cooks in {p} are proud of their {d} stew."),
]
WORK = ["fishing", "wool weaving", "shipbuilding", "copper mining", "apple orchards", "glassmaking", "printing"]
FESTIVALS = ["lanterns", "kites", "harvest bread", "boats", "masks", "bells", "candles"]
LANDMARKS = ["stone bridge", "clock tower", "lighthouse", "windmill", "abbey", "market hall", "castle wall"]
CLIMATES = ["warm and dry", "cool and misty", "short and rainy", "bright and windy", "mild and humid"]
DISHES = ["mushroom", "lamb", "barley", "smoked fish", "bean", "pumpkin", "mussel"]


def _fill(template: str, place: str, rng: random.Random) -> str:
    return template.format(p=place, n=rng.randint(3, 900), y=rng.randint(1100, 1899), w=rng.choice(WORK),
                           f=rng.choice(FESTIVALS), l=rng.choice(LANDMARKS), c=rng.choice(CLIMATES),
                           d=rng.choice(DISHES))


def qa_pairs(n_places: int = 40, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(anchors, positives, extra corpus). Every place gets most attributes as (question, answer); one
    question in ~9 gets a second answer (a duplicate anchor: a query with two positives), two queries
    share one answer, and one answer is also asked as a query's text. Texts are distinct even ignoring
    case and spacing (so that no two texts tokenize alike)."""
    rng = random.Random(seed)
    anchors, positives, extra = [], [], []
    for place in PLACES[:n_places]:
        for _, question, answer in ATTRIBUTES:
            if rng.random() < 0.15:
                extra.append(_fill(answer, place, rng))  # a fact with no question: a distractor only
                continue
            q, a = _fill(question, place, rng), _fill(answer, place, rng)
            anchors.append(q)
            positives.append(a)
            if rng.random() < 0.11:
                anchors.append(q)
                positives.append(_fill(answer, place, rng).replace(".", ", as records show."))
    anchors.append("Which town shares its answer with another?")
    positives.append(positives[0])
    anchors.append(positives[3])  # a query whose text is in the corpus
    positives.append(positives[4])
    seen: set[str] = set()
    texts = anchors + positives + extra
    for t in texts:
        key = " ".join(t.split()).casefold()
        assert key not in seen or t in seen, t  # exact repeats are intended, near-duplicates are not
        seen.add(key)
        seen.add(t)
    return anchors, positives, extra


def synthetic_corpus(n: int, seed: int = 1) -> list[str]:
    """n distinct short sentences about made-up places (the benchmark's large corpus)."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        place = f"{rng.choice(PLACES)} {rng.choice(['North', 'South', 'Upper', 'Lower', 'Old', 'New'])} " \
                f"{rng.randint(1, 99)}"
        text = _fill(rng.choice(ATTRIBUTES)[2], place, rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def benchmark_pairs(n_queries: int, n_docs: int, seed: int = 2) -> tuple[list[str], list[str], list[str]]:
    """(anchors, positives, extra corpus) for the benchmark: n_queries questions, each with one answer
    about its own made-up place, and n_docs - n_queries further distinct answers as distractors."""
    rng = random.Random(seed)
    anchors, positives, seen = [], [], set()
    while len(anchors) < n_queries:
        place = f"{rng.choice(PLACES)} {rng.choice(['North', 'South', 'Upper', 'Lower', 'Old', 'New'])} " \
                f"{rng.randint(1, 999)}"
        _, question, answer = rng.choice(ATTRIBUTES)
        q, a = _fill(question, place, rng), _fill(answer, place, rng)
        if q in seen or a in seen:
            continue
        seen.update((q, a))
        anchors.append(q)
        positives.append(a)
    extra = [t for t in synthetic_corpus(n_docs + n_queries // 10 + 10, seed=seed + 1) if t not in seen]
    extra = extra[: n_docs - n_queries]
    return anchors, positives, extra
