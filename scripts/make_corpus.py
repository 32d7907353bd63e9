#!/usr/bin/env python3
"""Generate dsel's bundled multi-domain corpus and its lm-eval task files (deterministic, no downloads).

Six domains of template English (science, recipes, sports, legal, software, travel). Each domain
draws its sentences from fixed knowledge tables, so facts repeat consistently across documents
and a small LM can learn them. The target domain is `science`: it is rare in the pool, so a
selection method that finds it has something to gain over random data.

Writes (all jsonl.gz records {"id", "domain", "text"}):
    dsel/data/bundled/pool.jsonl.gz            the corpus to select from (all domains, shuffled)
    dsel/data/bundled/target.jsonl.gz          held-out science documents: the selection target
    dsel/data/bundled/valid/<domain>.jsonl.gz  held-out validation documents of every domain
    dsel/eval/tasks/dsel_science/facts.jsonl   a multiple-choice task over the science facts

    python3 scripts/make_corpus.py            # rewrites the files above (byte-identical each time)
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_DOMAIN = "science"
# Documents per domain in the pool: the target is rare.
POOL_DOCS = {"science": 300, "recipes": 700, "sports": 700, "legal": 700, "software": 700, "travel": 700}
TARGET_DOCS = 300
VALID_DOCS = 60

# ---- knowledge tables: the facts each domain repeats -------------------------------------------
COMPOUNDS = {  # name: (boiling point in C, use, colour)
    "ethanol": (78, "disinfectants", "colourless"), "acetone": (56, "nail polish remover", "colourless"),
    "glycerol": (290, "soap making", "colourless"), "benzene": (80, "plastics", "colourless"),
    "bromine": (59, "flame retardants", "reddish brown"), "mercury": (357, "thermometers", "silvery"),
    "toluene": (111, "paint thinners", "colourless"), "methanol": (65, "antifreeze", "colourless"),
    "iodine": (184, "antiseptics", "violet"), "phenol": (182, "resins", "white"),
    "hexane": (69, "oil extraction", "colourless"), "ammonia": (-33, "fertilisers", "colourless"),
}
PLANETS = {  # name: (orbital period in days, moons)
    "Mercury": (88, 0), "Venus": (225, 0), "Earth": (365, 1), "Mars": (687, 2),
    "Jupiter": (4333, 95), "Saturn": (10759, 146), "Uranus": (30687, 28), "Neptune": (60190, 16),
}
ORGANISMS = {  # name: (habitat, diet)
    "the axolotl": ("freshwater lakes", "worms and small fish"), "the koala": ("eucalyptus forests", "eucalyptus leaves"),
    "the octopus": ("rocky reefs", "crabs and clams"), "the hummingbird": ("tropical forests", "flower nectar"),
    "the tardigrade": ("damp moss", "plant cells"), "the snow leopard": ("high mountains", "wild sheep"),
    "the sea otter": ("kelp forests", "sea urchins"), "the fennec fox": ("sandy deserts", "insects and rodents"),
}
ELEMENTS = {"hydrogen": 1, "helium": 2, "carbon": 6, "nitrogen": 7, "oxygen": 8, "sodium": 11, "iron": 26,
            "copper": 29, "silver": 47, "gold": 79, "lead": 82, "uranium": 92}
SCIENTISTS = ["Dr. Amara Okafor", "Prof. Lena Vogel", "Dr. Hiro Tanaka", "Dr. Sofia Marquez", "Prof. Daniel Reyes",
              "Dr. Priya Nair", "Prof. Tomas Lindqvist", "Dr. Grace Liu"]
INSTITUTES = ["the Northfield Institute", "Coastal University", "the Royal Observatory", "the Lakeside Laboratory",
              "the Institute of Molecular Studies", "Highland Polytechnic"]

DISHES = {  # dish: (oven temperature C, minutes, key ingredient)
    "banana bread": (175, 60, "ripe bananas"), "lemon tart": (180, 35, "fresh lemons"),
    "shepherd's pie": (200, 30, "minced lamb"), "focaccia": (220, 25, "olive oil"),
    "apple crumble": (190, 40, "tart apples"), "roast chicken": (210, 75, "a whole chicken"),
    "carrot cake": (170, 50, "grated carrots"), "vegetable lasagna": (190, 45, "courgettes"),
}
INGREDIENTS = ["butter", "flour", "sugar", "eggs", "milk", "salt", "garlic", "onions", "thyme", "cinnamon",
               "cream", "black pepper", "parmesan", "honey", "yeast", "baking powder"]
TEAMS = {  # team: (city, stadium)
    "the Harbor Hawks": ("Portsmouth", "Gull Park"), "the River City Rovers": ("Riverton", "Mill Lane"),
    "the Granite Bears": ("Stonebridge", "Quarry Field"), "the Valley Vipers": ("Greendale", "Orchard Arena"),
    "the Northern Stars": ("Frostholm", "Aurora Stadium"), "the Desert Foxes": ("Sandmouth", "Dune Park"),
}
PLAYERS = ["Marco Silva", "Jamal Carter", "Kenji Mori", "Lucas Brandt", "Omar Haddad", "Ethan Walsh",
           "Diego Ramos", "Felix Novak", "Samuel Osei", "Ivan Petrov"]
LEGAL_TERMS = ["Confidential Information", "Effective Date", "Services", "Deliverables", "Term", "Fees",
               "Intellectual Property", "Territory", "Force Majeure Event", "Governing Law"]
COMPANIES = ["Northwind Holdings Ltd", "Bluepeak Systems Inc", "Harbor & Vale LLP", "Crescent Logistics GmbH",
             "Silverline Media Corp", "Oakridge Partners LLC"]
FUNCTIONS = {  # name: (arguments, returns)
    "parse_config": ("path, strict=True", "a dictionary of settings"), "merge_frames": ("left, right, on", "a new frame"),
    "retry": ("fn, attempts=3, delay=1.0", "the result of the first successful call"),
    "load_index": ("prefix", "an Index object"), "hash_file": ("path, algorithm='sha256'", "the hex digest"),
    "chunked": ("items, size", "an iterator of lists"), "slugify": ("text", "a lowercase string with hyphens"),
    "open_pool": ("workers=4", "a context manager yielding a Pool"),
}
CITIES = {  # city: (landmark, dish, season)
    "Lisbon": ("the Belem Tower", "custard tarts", "spring"), "Kyoto": ("the bamboo grove", "matcha sweets", "autumn"),
    "Marrakesh": ("the old medina", "lamb tagine", "winter"), "Reykjavik": ("the harbour", "fish soup", "summer"),
    "Oaxaca": ("the Zocalo", "mole negro", "autumn"), "Tallinn": ("the old town walls", "rye bread", "summer"),
    "Hanoi": ("Hoan Kiem Lake", "pho", "spring"), "Cusco": ("the Plaza de Armas", "roasted corn", "winter"),
}


def upper_first(text: str) -> str:
    """Capitalise the first letter only (str.capitalize would lowercase names)."""
    return text[:1].upper() + text[1:]


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 21st, ..."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def pick(rng: random.Random, table) -> tuple:
    """A random (key, value) of a dict, or a random item of a list."""
    if isinstance(table, dict):
        key = rng.choice(sorted(table))
        return key, table[key]
    return rng.choice(table)


# ---- one sentence generator per domain; a document strings several together ----------------------
def science_sentence(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        name, (bp, use, colour) = pick(rng, COMPOUNDS)
        return rng.choice([f"{upper_first(name)} boils at {bp} degrees Celsius.",
                           f"At normal pressure, {name} boils at {bp} degrees Celsius and is used in {use}.",
                           f"{upper_first(name)} is a {colour} substance that boils at {bp} degrees Celsius."])
    if kind == 1:
        name, (period, moons) = pick(rng, PLANETS)
        moon_text = "no moons" if moons == 0 else ("one moon" if moons == 1 else f"{moons} known moons")
        return rng.choice([f"{name} orbits the Sun once every {period} days.",
                           f"{name} has {moon_text} and completes an orbit in {period} days."])
    if kind == 2:
        name, (habitat, diet) = pick(rng, ORGANISMS)
        return rng.choice([f"{upper_first(name)} lives in {habitat} and feeds on {diet}.",
                           f"Field biologists observed that {name} feeds on {diet}."])
    if kind == 3:
        name, number = pick(rng, ELEMENTS)
        return rng.choice([f"The atomic number of {name} is {number}.",
                           f"Every atom of {name} has {number} protons in its nucleus."])
    if kind == 4:
        who, where = pick(rng, SCIENTISTS), pick(rng, INSTITUTES)
        name, _ = pick(rng, COMPOUNDS)
        return (f"{who} of {where} measured the {rng.choice(['density', 'viscosity', 'conductivity', 'heat capacity'])} "
                f"of {name} at {rng.randrange(5, 95)} degrees with an uncertainty of {rng.randrange(1, 9)} percent.")
    if kind == 5:
        return rng.choice(["The results were consistent with the hypothesis.",
                           "Further experiments are needed to confirm the effect.",
                           "The samples were stored at low temperature before analysis.",
                           "Each measurement was repeated three times to reduce the error.",
                           "The data support a linear relationship between the two quantities."])
    name, (_, use, _) = pick(rng, COMPOUNDS)
    return f"Because of its properties, {name} is widely used in {use}."


def recipes_sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    dish, (temp, minutes, key) = pick(rng, DISHES)
    if kind == 0:
        return f"To make {dish}, preheat the oven to {temp} degrees and bake for {minutes} minutes."
    if kind == 1:
        return f"The secret of a good {dish} is {key}, so buy the best you can find."
    a, b = rng.sample(INGREDIENTS, 2)
    if kind == 2:
        return f"Whisk {rng.randrange(50, 400, 25)} grams of {a} with {rng.randrange(1, 5)} tablespoons of {b}."
    if kind == 3:
        return f"Season with {a} and a pinch of {b}, then stir gently for {rng.randrange(2, 12)} minutes."
    return rng.choice(["Let it cool on a wire rack before slicing.", "Serve warm with a spoonful of cream.",
                       "This keeps for three days in an airtight tin.", "Fold the mixture carefully so it stays light."])


def sports_sentence(rng: random.Random) -> str:
    (home, (city, stadium)), (away, _) = rng.sample(sorted(TEAMS.items()), 2)
    kind = rng.randrange(5)
    player = pick(rng, PLAYERS)
    if kind == 0:
        return f"{upper_first(home)} beat {away} {rng.randrange(1, 6)}-{rng.randrange(0, 3)} at {stadium} on {rng.choice(['Saturday', 'Sunday', 'Wednesday'])}."
    if kind == 1:
        return f"{player} scored in the {ordinal(rng.randrange(2, 90))} minute to give {home} the lead."
    if kind == 2:
        return f"A crowd of {rng.randrange(8, 60)},{rng.randrange(100, 999)} watched the match in {city}."
    if kind == 3:
        return f"The coach praised {player} for an outstanding performance in defence."
    return rng.choice(["The referee showed two yellow cards in the second half.", "Both sides created chances early on.",
                       "The visitors struggled to keep possession after the break.", "It was their third win in a row."])


def legal_sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    term, party = pick(rng, LEGAL_TERMS), pick(rng, COMPANIES)
    if kind == 0:
        a, b = rng.sample(COMPANIES, 2)
        return f"This Agreement is entered into by and between {a} and {b} as of the Effective Date."
    if kind == 1:
        return f"Section {rng.randrange(1, 20)}.{rng.randrange(1, 9)}. \"{term}\" has the meaning given in the Schedule."
    if kind == 2:
        return f"{party} shall not disclose any {term} to a third party without prior written consent."
    if kind == 3:
        return f"Either party may terminate this Agreement upon {rng.choice([30, 60, 90])} days written notice."
    return rng.choice(["This Agreement shall be governed by the laws of England and Wales.",
                       "Nothing in this Agreement shall limit liability for fraud.",
                       "The obligations in this clause survive termination of this Agreement.",
                       "Any amendment must be made in writing and signed by both parties."])


def software_sentence(rng: random.Random) -> str:
    name, (args, returns) = pick(rng, FUNCTIONS)
    kind = rng.randrange(5)
    if kind == 0:
        return f"`{name}({args})` returns {returns}."
    if kind == 1:
        return f"Example: `result = {name}({args.split(',')[0]})` followed by `print(result)`."
    if kind == 2:
        return f"Raises `ValueError` if the argument is empty; call `{name}` again after fixing the input."
    if kind == 3:
        return f"Since version {rng.randrange(1, 4)}.{rng.randrange(0, 12)}, `{name}` accepts keyword arguments only after the first."
    return rng.choice(["Install the package with `pip install toolkit`.", "All functions are thread safe.",
                       "See the changelog for deprecated options.", "Logging is disabled by default."])


def travel_sentence(rng: random.Random) -> str:
    city, (landmark, dish, season) = pick(rng, CITIES)
    kind = rng.randrange(5)
    if kind == 0:
        return f"Our first morning in {city} began with a walk to {landmark}."
    if kind == 1:
        return f"In {city}, do not leave without trying {dish} from a street stall."
    if kind == 2:
        return f"The best time to visit {city} is {season}, when the crowds are smaller."
    if kind == 3:
        return f"We stayed {rng.randrange(2, 9)} nights in a small guesthouse near {landmark}."
    return rng.choice(["The train was slow but the views were worth it.", "Carry some cash for the markets.",
                       "Evenings were cool, so pack a light jacket.", "Our guide spoke three languages."])


SENTENCES = {"science": science_sentence, "recipes": recipes_sentence, "sports": sports_sentence,
             "legal": legal_sentence, "software": software_sentence, "travel": travel_sentence}


def document(domain: str, rng: random.Random) -> str:
    """A document: 2-4 paragraphs of 3-6 sentences of one domain."""
    paragraphs = [" ".join(SENTENCES[domain](rng) for _ in range(rng.randint(3, 6))) for _ in range(rng.randint(2, 4))]
    return "\n".join(paragraphs)


def documents(domain: str, split: str, count: int, seed: int) -> list[dict]:
    """`count` documents of a domain for a split, seeded by (seed, domain, split)."""
    rng = random.Random(f"{seed}/{domain}/{split}")
    return [{"id": f"{domain}/{split}/{k:05d}", "domain": domain, "text": document(domain, rng)} for k in range(count)]


def science_facts() -> list[dict]:
    """Multiple-choice questions over the science tables: a prefix and four candidate endings."""
    rng = random.Random("facts")
    items = []
    for name, (bp, _, _) in sorted(COMPOUNDS.items()):
        wrong = rng.sample(sorted({v[0] for k, v in COMPOUNDS.items() if v[0] != bp}), 3)
        items.append((f"{upper_first(name)} boils at", [f"{v} degrees Celsius." for v in [bp] + wrong]))
    for name, (period, _) in sorted(PLANETS.items()):
        wrong = rng.sample(sorted(v[0] for k, v in PLANETS.items() if k != name), 3)
        items.append((f"{name} orbits the Sun once every", [f"{v} days." for v in [period] + wrong]))
    for name, (habitat, diet) in sorted(ORGANISMS.items()):
        wrong = rng.sample(sorted(v[1] for k, v in ORGANISMS.items() if k != name), 3)
        items.append((f"{upper_first(name)} lives in {habitat} and feeds on", [f"{v}." for v in [diet] + wrong]))
    for name, number in sorted(ELEMENTS.items()):
        wrong = rng.sample(sorted(v for k, v in ELEMENTS.items() if k != name), 3)
        items.append((f"The atomic number of {name} is", [f"{v}." for v in [number] + wrong]))
    rows = []
    for k, (context, choices) in enumerate(items):
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"id": k, "context": context, "choices": [choices[i] for i in order], "label": order.index(0)})
    return rows


def write_jsonl(path: Path, rows: list[dict], compress: bool = True) -> None:
    """jsonl (gzip with a fixed mtime, so the bytes do not change between runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if compress:
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_corpus(seed: int = 0, scale: float = 1.0, out: Path = ROOT / "dsel" / "data" / "bundled",
                tasks: Path = ROOT / "dsel" / "eval" / "tasks" / "dsel_science") -> None:
    """Write the pool, target, validation and task files."""
    pool = [d for domain, n in POOL_DOCS.items() for d in documents(domain, "pool", max(1, int(n * scale)), seed)]
    random.Random(f"{seed}/shuffle").shuffle(pool)
    write_jsonl(out / "pool.jsonl.gz", pool)
    write_jsonl(out / "target.jsonl.gz", documents(TARGET_DOMAIN, "target", max(1, int(TARGET_DOCS * scale)), seed))
    for domain in SENTENCES:
        write_jsonl(out / "valid" / f"{domain}.jsonl.gz", documents(domain, "valid", max(1, int(VALID_DOCS * scale)), seed))
    write_jsonl(tasks / "facts.jsonl", science_facts(), compress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every document count")
    parser.add_argument("--out", type=Path, default=ROOT / "dsel" / "data" / "bundled")
    parser.add_argument("--tasks", type=Path, default=ROOT / "dsel" / "eval" / "tasks" / "dsel_science")
    args = parser.parse_args()
    make_corpus(args.seed, args.scale, args.out, args.tasks)


if __name__ == "__main__":
    main()
