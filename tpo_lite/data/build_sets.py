"""Generate the embedded instruction sets ``train.jsonl`` (300) and ``heldout.jsonl`` (100).

Run from the repository root: ``python tpo_lite/data/build_sets.py`` (deterministic: same output every time).

Each instruction is an everyday task (a *base*: a task template filled with a topic, or a math word problem
with its computed answer) plus 1-3 IFEval-style constraints whose wording is appended to the task and whose
check goes into ``checks``. Constraints are drawn so they never contradict each other (each belongs to
"slots" -- case, length, structure, start, end, ... -- and two constraints never share a slot).

No overlap: within each category the topics (or, for math, the problem templates) are split between the sets
before any instruction is built, so no held-out instruction shares its topic -- let alone its text -- with a
training instruction. Limits are chosen so a 135M instruct model passes some and fails others.

Length balance: the training set asks for "at most" and "at least" (words or sentences) about equally often
(``TRAIN_WEIGHTS``), so "answer shorter" is not a shortcut DPO can learn from the data's mix alone. The held-out
set is frozen as first drawn (``HELDOUT_WEIGHTS``, which favoured ``max_words`` 3:1 but happened to draw 22
"at most" and 22 "at least"): it is drawn from the seed's stream right after a training set drawn with those
weights, so that draw is replayed and discarded, and the training set is then drawn from its own stream.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20241014
TRAIN_SEED = 20241015  # the training set's own stream (see the module docstring)
N_TRAIN, N_HELDOUT = 300, 100
HERE = Path(__file__).resolve().parent

# category -> list of (task template with {t}, topics). Topics are split train/held-out per template.
TASKS: dict[str, list[tuple[str, list[str]]]] = {
    "writing": [
        ("Write a short poem about {t}.", [
            "autumn leaves", "a lighthouse keeper", "morning coffee", "a city at night", "a rainy Monday",
            "an old bicycle", "a mountain lake", "a street musician", "a snowy village", "a night train",
            "a stray cat", "the ocean at dawn", "a summer thunderstorm", "a grandmother's kitchen",
            "the first snowfall", "a field of sunflowers"]),
        ("Write a very short story about {t}.", [
            "a lost umbrella", "a friendly robot", "a birthday surprise", "a library after closing",
            "a forgotten key", "a talking parrot", "a missed bus", "a kite stuck in a tree", "a secret garden",
            "a broken clock", "a dog who learns to swim", "a letter found in a book", "a power cut",
            "the last slice of pizza"]),
        ("Write a product description for {t}.", [
            "a reusable water bottle", "noise-cancelling headphones", "a bamboo toothbrush", "a standing desk",
            "a solar phone charger", "a wool winter hat", "a smart plant pot", "a folding bicycle",
            "a cast iron pan", "a travel pillow", "a mechanical keyboard", "a picnic blanket"]),
    ],
    "email": [
        ("Write an email to {t}.", [
            "your manager asking for a day off next Friday", "a landlord about a broken heater",
            "a colleague thanking them for their help on a project", "a teacher about a child's absence",
            "a customer apologising for a late delivery", "a neighbour about a noisy party",
            "a friend inviting them to a barbecue", "a hotel asking to change a booking",
            "a company declining a job offer politely", "a team announcing a new meeting time",
            "a gym cancelling a membership", "a professor asking for a recommendation letter",
            "a plumber asking for a quote", "a client following up on an unpaid invoice",
            "a new colleague welcoming them to the team", "a shop asking about a refund",
            "a conference organiser asking about the schedule", "your team after a successful launch"]),
    ],
    "explanation": [
        ("Explain {t} to a ten-year-old.", [
            "why the sky is blue", "how rainbows form", "what gravity is", "how vaccines work",
            "why we have seasons", "how bees make honey", "what electricity is", "how airplanes fly",
            "why the moon changes shape", "how the internet works", "what a volcano is", "how plants eat",
            "why ice floats", "how a compass works", "what photosynthesis is", "why we dream"]),
        ("Explain {t} in simple terms.", [
            "what inflation is", "how a credit score works", "what machine learning is", "how recycling works",
            "what a carbon footprint is", "how interest on a loan works", "what cloud storage is",
            "how a bill becomes a law", "what the stock market is", "how GPS finds your location",
            "what a password manager does", "how noise-cancelling headphones work"]),
    ],
    "advice": [
        ("Give advice to someone who {t}.", [
            "is nervous before a job interview", "wants to start running", "struggles to fall asleep",
            "wants to save money each month", "is moving to a new city", "wants to learn a new language",
            "feels overwhelmed at work", "wants to make new friends as an adult", "procrastinates a lot",
            "is starting their first job", "wants to read more books", "is preparing for a long exam",
            "wants to spend less time on their phone", "is hosting their first dinner party",
            "wants to keep houseplants alive", "is learning to cook", "wants to be more organised",
            "is going to a wedding alone"]),
    ],
    "lists": [
        ("List some {t}.", [
            "ideas for a rainy weekend", "ways to reduce food waste", "tips for a productive morning",
            "board games for a family night", "healthy snacks for work", "ways to be kind to strangers",
            "things to pack for a beach day", "hobbies that cost little money", "ways to save electricity",
            "questions to ask in a job interview", "fun facts about octopuses", "uses for baking soda",
            "ideas for a child's birthday party", "ways to stay cool in summer", "habits of good listeners",
            "indoor exercises without equipment"]),
    ],
    "summarising": [
        ("Summarise the following text: \"{t}\"", [
            "The town council met on Tuesday to discuss the new park. Residents asked for more trees and a "
            "playground. The council agreed to publish a plan next month and to hold another meeting.",
            "Regular walking improves heart health, lifts mood and helps with sleep. Experts suggest thirty "
            "minutes a day. Even short walks after meals can lower blood sugar.",
            "The bakery on Main Street will close for two weeks in August for repairs. It will reopen with a "
            "bigger kitchen and new seating. Online orders will continue during the closure.",
            "Honeybees communicate through a waggle dance. The angle of the dance shows the direction of "
            "flowers, and its length shows the distance. Other bees watch and then fly to the food.",
            "Our team finished the website redesign a week early. Page loading is now twice as fast. Next "
            "quarter we will focus on the mobile app and customer feedback.",
            "The library now lends tools such as drills and ladders. Members can borrow up to three items "
            "for one week. The service is free and popular with new home owners.",
            "Drinking enough water helps concentration and energy. Many people mistake thirst for hunger. "
            "Carrying a bottle makes it easier to drink through the day.",
            "The museum's new exhibit shows ancient maps from five continents. Visitors can zoom into "
            "digital copies. The exhibit runs until March and entry is free on Sundays.",
            "Remote work saves commuting time but can feel lonely. Some companies now offer shared office "
            "days. Workers say a mix of home and office suits them best.",
            "A new bus line connects the university with the train station. Buses run every ten minutes at "
            "peak times. Students get a discount with their campus card.",
            "Composting turns kitchen scraps into rich soil. It needs a mix of green and brown material, air "
            "and some water. Most composts are ready in three to six months.",
            "The school will start thirty minutes later next year. Studies show teenagers sleep better with "
            "later starts. Parents will be asked for feedback after the first term."]),
    ],
    "classification": [
        ("Classify the sentiment of this review as positive, negative or neutral: \"{t}\"", [
            "The food arrived cold and the waiter ignored us.", "Absolutely loved the hotel, the staff were "
            "wonderful.", "The package arrived on Tuesday.", "Battery life is great but the screen scratches "
            "easily.", "Worst customer service I have ever had.", "A cosy cafe with the best cinnamon rolls.",
            "The film was long and nothing much happened.", "It does what it says, nothing more.",
            "My new shoes fell apart after a week.", "The guide was funny and knew so much history.",
            "The app crashes every time I open it.", "Fast shipping and the fit is perfect.",
            "The room was clean; the view was a car park.", "I would happily buy this blender again."]),
        ("Classify this message as spam or not spam: \"{t}\"", [
            "Congratulations! You won a free cruise, click here now!", "Hi, are we still meeting at six?",
            "Your account will be closed unless you confirm your password today.", "Mum says dinner is at "
            "seven on Sunday.", "Earn money from home, no experience needed!!!", "The report is attached, "
            "let me know what you think.", "Limited offer: cheap watches, 90% off, today only.",
            "Can you pick up milk on the way home?", "You have been selected for a secret prize, reply YES.",
            "Reminder: dentist appointment tomorrow at 10am."]),
        ("Which category does this question belong to: sports, science, cooking or travel? \"{t}\"", [
            "How long should I boil an egg for a soft yolk?", "Who won the last football world cup?",
            "What is the best time of year to visit Japan?", "Why do stars twinkle?",
            "How do I make bread rise faster?", "What do I need for a visa to Canada?",
            "How many players are on a basketball team?", "What is a black hole?",
            "Can I freeze cooked rice?", "Which train goes from Paris to Rome?"]),
    ],
    "rewriting": [
        ("Rewrite the following sentence to sound more formal: \"{t}\"", [
            "hey, can u send me the file asap?", "the meeting was kinda a waste of time",
            "we gotta fix this bug before friday", "thanks a ton for the help yesterday",
            "sorry, i totally forgot about the deadline", "the new guy is super good at his job",
            "can we push the call to later?", "this product is awesome, buy it",
            "i'm gonna be late, traffic is crazy", "let's grab lunch and talk about the plan"]),
        ("Rewrite the following text in a friendlier tone: \"{t}\"", [
            "Your request has been denied.", "Submit the form by Monday or it will not be processed.",
            "The office is closed. Come back tomorrow.", "You did not follow the instructions.",
            "Payment is overdue. Pay now.", "No pets allowed in the building.",
            "Your order has been delayed.", "Read the manual before asking questions."]),
    ],
    "coding": [
        ("Write a Python function that {t}, and explain it briefly.", [
            "reverses a string", "checks whether a number is prime", "counts the vowels in a word",
            "returns the largest number in a list", "converts Celsius to Fahrenheit",
            "checks whether a word is a palindrome", "removes duplicates from a list",
            "returns the factorial of a number", "counts how often each word appears in a sentence",
            "returns the average of a list of numbers", "checks whether a year is a leap year",
            "merges two sorted lists", "returns the n-th Fibonacci number", "capitalises every word in a "
            "sentence"]),
        ("Explain what {t} means in programming.", [
            "a variable", "a loop", "a function", "recursion", "an API", "a bug", "version control",
            "a database", "an array", "a compiler"]),
    ],
    "health": [
        ("Give tips on {t}.", [
            "drinking more water", "stretching after a workout", "eating more vegetables",
            "improving posture at a desk", "starting strength training", "getting better sleep",
            "reducing stress", "walking 10,000 steps a day", "eating a healthy breakfast",
            "protecting your eyes from screens", "staying active when working from home",
            "preparing for a first 5k run", "cutting down on sugar", "warming up before exercise"]),
    ],
    "travel": [
        ("Plan a short trip to {t}.", [
            "Paris", "Tokyo", "the Scottish Highlands", "Barcelona", "New York City", "Rome", "Iceland",
            "Lisbon", "Kyoto", "Vienna", "Cape Town", "Vancouver", "Prague", "Mexico City", "Istanbul",
            "Amsterdam"]),
        ("Give packing advice for {t}.", [
            "a weekend camping trip", "a business trip", "a ski holiday", "a long flight",
            "a beach holiday", "a hiking trip", "a trip with a baby", "a rainy city break"]),
    ],
    "food": [
        ("Write a simple recipe for {t}.", [
            "pancakes", "tomato soup", "guacamole", "fried rice", "banana bread", "a green salad",
            "scrambled eggs", "lemonade", "vegetable curry", "oatmeal cookies", "hummus", "a fruit smoothie",
            "garlic bread", "lentil soup"]),
    ],
    "finance": [
        ("Explain how to {t}.", [
            "make a monthly budget", "build an emergency fund", "pay off a credit card", "compare two phone "
            "plans", "save for a holiday", "track daily spending", "split bills with flatmates",
            "avoid impulse buying", "start investing with a small amount", "read a payslip",
            "plan for a big purchase", "lower your grocery bill"]),
    ],
    "social": [
        ("Write a short social media post about {t}.", [
            "a new bakery opening in town", "a charity fun run", "finishing a first marathon",
            "a community garden clean-up day", "adopting a rescue dog", "a book club meeting",
            "a local farmers market", "a school science fair", "a new podcast episode", "a summer sale",
            "a volunteer beach clean-up", "a team winning a local cup", "a new art exhibition",
            "learning to knit", "a neighbourhood street party", "a first day at a new job"]),
    ],
    "career": [
        ("Write a short cover letter opening for {t}.", [
            "a junior web developer job", "a barista position", "a nursing role", "a marketing internship",
            "a primary school teacher job", "a data analyst role", "a graphic designer position",
            "a sales assistant job"]),
        ("Describe how to {t}.", [
            "prepare for a salary negotiation", "write a good CV", "give useful feedback to a colleague",
            "run an effective meeting", "ask for a promotion", "make a good first impression at work",
            "manage your time during a busy week", "network at a conference"]),
    ],
}

# Math word problems: (template, answer function, parameter sampler). Split by template between the sets.
MATH = [
    ("A shop sells pens for ${a} each. Maria buys {b} pens. How many dollars does she spend?",
     lambda a, b: a * b, lambda r: dict(a=r.randint(2, 9), b=r.randint(3, 12))),
    ("A train travels at {a} km per hour for {b} hours. How many kilometres does it travel?",
     lambda a, b: a * b, lambda r: dict(a=r.choice([40, 60, 80, 90, 120]), b=r.randint(2, 6))),
    ("Tom has {a} apples and gives away {b}. Then he buys {c} more. How many apples does he have now?",
     lambda a, b, c: a - b + c, lambda r: dict(a=r.randint(10, 30), b=r.randint(1, 9), c=r.randint(2, 15))),
    ("A class of {a} students is split into groups of {b}. How many groups are there?",
     lambda a, b: a // b, lambda r: (lambda b: dict(a=b * r.randint(3, 9), b=b))(r.randint(2, 6))),
    ("A recipe needs {a} grams of flour per cake. How many grams are needed for {b} cakes?",
     lambda a, b: a * b, lambda r: dict(a=r.choice([150, 200, 250, 300]), b=r.randint(2, 7))),
    ("Anna saves ${a} every week. How many dollars has she saved after {b} weeks?",
     lambda a, b: a * b, lambda r: dict(a=r.randint(5, 25), b=r.randint(4, 12))),
    ("A rectangle is {a} cm long and {b} cm wide. What is its area in square centimetres?",
     lambda a, b: a * b, lambda r: dict(a=r.randint(3, 15), b=r.randint(2, 10))),
    ("A book has {a} pages. Sam reads {b} pages a day. How many pages are left after {c} days?",
     lambda a, b, c: a - b * c, lambda r: dict(a=r.randint(200, 400), b=r.randint(10, 30), c=r.randint(2, 6))),
    ("A ticket costs ${a}. A family buys {b} tickets and pays with ${c}. How much change do they get?",
     lambda a, b, c: c - a * b, lambda r: (lambda a, b: dict(a=a, b=b, c=(a * b // 50 + 1) * 50))(
         r.randint(6, 20), r.randint(2, 5))),
    ("There are {a} red balls and {b} blue balls in a box. How many balls are there in total?",
     lambda a, b: a + b, lambda r: dict(a=r.randint(10, 60), b=r.randint(10, 60))),
]
MATH_HELDOUT_TEMPLATES = {2, 7}  # indices whose problems only appear in the held-out set
MATH_PER_TEMPLATE = {"train": 6, "heldout": 8}

WORDS = {  # words that fit each category, for include / frequency constraints
    "writing": ["light", "quiet", "remember", "warm", "journey", "silver"],
    "email": ["schedule", "grateful", "Friday", "update", "appreciate"],
    "explanation": ["example", "because", "energy", "simple", "imagine"],
    "advice": ["practice", "patience", "routine", "goal", "small"],
    "lists": ["easy", "fun", "cheap", "family", "time"],
    "summarising": ["main", "plan", "people", "new"],
    "classification": ["because", "tone", "words", "clearly"],
    "rewriting": ["please", "kindly", "thank", "appreciate"],
    "coding": ["return", "list", "input", "example", "loop"],
    "health": ["water", "sleep", "body", "daily", "habit"],
    "travel": ["museum", "walk", "budget", "local", "morning"],
    "food": ["salt", "minutes", "bowl", "fresh", "heat"],
    "finance": ["budget", "save", "monthly", "goal", "money"],
    "social": ["join", "today", "community", "thanks", "excited"],
    "career": ["experience", "team", "skills", "confident", "prepare"],
    "math": ["total", "answer", "each"],
}
AVOID = ["very", "really", "just", "good", "also", "thing", "important", "great"]
STARTS = ["Sure", "Firstly", "Well", "Honestly", "Today", "Imagine"]
ENDS = ["Is there anything else I can help with?", "Hope this helps!", "Thank you for reading.",
        "That is all.", "Let me know if you have any questions."]
JSON_KEYS = {
    "classification": [["label", "reason"], ["category", "confidence"]],
    "travel": [["destination", "days", "activities"], ["items", "tip"]],
    "food": [["name", "ingredients", "steps"]],
    "lists": [["items"], ["title", "items"]],
    "health": [["tips", "summary"]],
    "advice": [["advice", "reason"]],
    "summarising": [["summary", "keywords"]],
    "math": [["answer", "explanation"]],
}


def q(s: str) -> str:
    return f"\"{s}\""


def and_join(items: list[str]) -> str:
    items = [q(w) for w in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# Constraint makers: (slots, weight, maker(rng, category) -> (phrase, check)). Slots never shared in one
# instruction, which keeps constraints compatible (e.g. JSON output fills start, end, structure and case).
def _c_max_words(r, c):
    n = r.choice([25, 40, 50, 60, 80, 100, 120])
    return f"Use no more than {n} words.", {"type": "max_words", "value": n}


def _c_min_words(r, c):
    n = r.choice([40, 60, 80, 120, 150])
    return f"Use at least {n} words.", {"type": "min_words", "value": n}


def _c_max_sentences(r, c):
    n = r.choice([2, 3, 4, 5])
    return f"Use at most {n} sentences.", {"type": "max_sentences", "value": n}


def _c_min_sentences(r, c):
    n = r.choice([3, 4, 5, 6])
    return f"Use at least {n} sentences.", {"type": "min_sentences", "value": n}


def _c_num_sentences(r, c):
    n = r.choice([2, 3, 4])
    return f"Write exactly {n} sentences.", {"type": "num_sentences", "value": n}


def _c_num_paragraphs(r, c):
    n = r.choice([2, 3, 4])
    return (f"Write exactly {n} paragraphs, separated by a blank line.", {"type": "num_paragraphs", "value": n})


def _c_num_bullets(r, c):
    n = r.choice([2, 3, 4, 5])
    return (f"Format your answer as exactly {n} markdown bullet points, such as:\n- first point",
            {"type": "num_bullets", "value": n})


def _c_num_sections(r, c):
    n = r.choice([2, 3])
    return (f"Divide your answer into {n} sections and start each with \"Section X\", such as Section 1.",
            {"type": "num_sections", "value": n})


def _c_include(r, c):
    words = r.sample(WORDS[c], r.choice([1, 2]))
    return f"Include the word{'s' if len(words) > 1 else ''} {and_join(words)}.", \
        {"type": "include_words", "words": words}


def _c_exclude(r, c):
    words = r.sample(AVOID, r.choice([1, 2]))
    return f"Do not use the word{'s' if len(words) > 1 else ''} {and_join(words)}.", \
        {"type": "exclude_words", "words": words}


def _c_frequency(r, c):
    w, n = r.choice(WORDS[c]), r.choice([2, 3])
    return f"Use the word {q(w)} at least {n} times.", {"type": "keyword_frequency", "word": w, "min_count": n}


def _c_lowercase(r, c):
    return ("Write your entire answer in lowercase letters; no capital letters are allowed.",
            {"type": "lowercase"})


def _c_uppercase(r, c):
    return "Write your entire answer in English capital letters only.", {"type": "uppercase"}


def _c_starts(r, c):
    w = "Dear" if c == "email" and r.random() < 0.5 else r.choice(STARTS)
    return f"Start your answer with the word {q(w)}.", {"type": "starts_with", "word": w}


def _c_ends(r, c):
    p = "Best regards" if c == "email" and r.random() < 0.5 else r.choice(ENDS)
    return f"End your answer with the exact phrase {q(p)}.", {"type": "ends_with", "phrase": p}


def _c_title(r, c):
    return ("Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
            {"type": "title"})


def _c_highlights(r, c):
    n = r.choice([1, 2, 3])
    return (f"Highlight at least {n} part{'s' if n > 1 else ''} of your answer with markdown, "
            "such as *highlighted part*.", {"type": "num_highlights", "min_count": n})


def _c_postscript(r, c):
    return "At the end of your answer, add a postscript starting with P.S.", {"type": "postscript"}


def _c_no_commas(r, c):
    return "Do not use any commas in your answer.", {"type": "no_commas"}


def _c_quotation(r, c):
    return "Wrap your entire answer in double quotation marks.", {"type": "quotation"}


def _c_json(r, c):
    keys = r.choice(JSON_KEYS[c])
    key_text = and_join(keys)
    return (f"Answer only with a valid JSON object with the key{'s' if len(keys) > 1 else ''} {key_text}, "
            "and nothing else.", {"type": "json_keys", "keys": keys})


# (slots, weight in the held-out draw, maker); training weights differ only where TRAIN_WEIGHTS says.
CONSTRAINTS = [
    ({"length"}, 3, _c_max_words),
    ({"length"}, 1, _c_min_words),
    ({"length", "sentences"}, 1, _c_max_sentences),
    ({"length", "sentences"}, 1, _c_min_sentences),
    ({"structure", "sentences", "length"}, 1, _c_num_sentences),
    ({"structure"}, 1, _c_num_paragraphs),
    ({"structure"}, 2, _c_num_bullets),
    ({"structure"}, 1, _c_num_sections),
    ({"words"}, 3, _c_include),
    ({"avoid"}, 2, _c_exclude),
    ({"words"}, 1, _c_frequency),
    ({"case", "start", "end"}, 2, _c_lowercase),
    ({"case", "start", "end"}, 1, _c_uppercase),
    ({"start"}, 2, _c_starts),
    ({"end"}, 2, _c_ends),
    ({"title", "start"}, 1, _c_title),
    ({"format"}, 1, _c_highlights),
    ({"end"}, 1, _c_postscript),
    ({"punct"}, 1, _c_no_commas),
    ({"start", "end", "case"}, 1, _c_quotation),
    ({"start", "end", "structure", "case", "title", "format", "sentences", "length", "punct"}, 2, _c_json),
]


HELDOUT_WEIGHTS = {make: weight for _, weight, make in CONSTRAINTS}
# Length limits both ways equally often: max_words 3:1 over min_words made "shorter" win most training
# instructions, and trained models drifted to short answers (docs/measured/heldout_checks_fp32.json).
TRAIN_WEIGHTS = {**HELDOUT_WEIGHTS, _c_max_words: 2, _c_min_words: 2}


def pick_constraints(r: random.Random, category: str, n: int, taken: set[str] | None = None,
                     weights: dict | None = None):
    """``n`` mutually compatible constraints for ``category`` (phrases, checks); ``weights``: maker -> weight
    (default: the held-out draw's)."""
    taken = set(taken or ())
    weights = weights or HELDOUT_WEIGHTS
    phrases, checks = [], []
    pool = [c for c in CONSTRAINTS if c[2] is not _c_json or category in JSON_KEYS]
    for _ in range(n):
        options = [c for c in pool if not (c[0] & taken)]
        if not options:
            break
        slots, _, make = r.choices(options, weights=[weights[c[2]] for c in options])[0]
        phrase, check = make(r, category)
        taken |= slots
        phrases.append(phrase)
        checks.append(check)
    return phrases, checks


def bases(r: random.Random) -> dict[str, list[tuple[str, str, list]]]:
    """Per split: (category, task text, preset checks). Topics split ~3:1 per template, math by template."""
    out = {"train": [], "heldout": []}
    for category, templates in TASKS.items():
        for template, topics in templates:
            topics = list(topics)
            r.shuffle(topics)
            k = max(2, round(len(topics) / 4))
            for split, chosen in (("heldout", topics[:k]), ("train", topics[k:])):
                out[split] += [(category, template.format(t=t), []) for t in chosen]
    for i, (template, answer, params) in enumerate(MATH):
        split = "heldout" if i in MATH_HELDOUT_TEMPLATES else "train"
        seen = set()
        while len(seen) < MATH_PER_TEMPLATE[split]:
            p = params(r)
            text = template.format(**p)
            if text in seen:
                continue
            seen.add(text)
            out[split].append(("math", text + " Show your reasoning and give the final number at the end.",
                               [{"type": "numeric_answer", "value": answer(**p)}]))
    return out


def build_split(r: random.Random, items: list, want: int, prefix: str, weights: dict) -> list[dict]:
    """``want`` instructions from ``items`` (category, task, preset checks), constraints drawn with ``weights``."""
    items = list(items)
    r.shuffle(items)
    # Each base appears once; if a split needs more instructions than bases, bases repeat with other
    # constraints (never across splits).
    chosen = [items[i % len(items)] for i in range(want)]
    records, texts = [], set()
    for i, (category, task, preset) in enumerate(chosen):
        for _ in range(50):
            n = 1 if preset else r.choices([1, 2, 3], weights=[3, 5, 2])[0]
            taken = {"structure", "case", "start", "end", "title", "format", "punct"} if preset else set()
            phrases, checks = pick_constraints(r, category, n, taken, weights)
            text = task + " " + " ".join(phrases)
            if text not in texts:
                break
        texts.add(text)
        records.append({"id": f"{prefix}-{i:04d}", "instruction": text, "category": category,
                        "checks": preset + checks})
    return records


def build() -> dict[str, list[dict]]:
    r = random.Random(SEED)
    split_bases = bases(r)
    build_split(r, split_bases["train"], N_TRAIN, "train", HELDOUT_WEIGHTS)  # replayed: brings r to the held-out draw
    heldout = build_split(r, split_bases["heldout"], N_HELDOUT, "heldout", HELDOUT_WEIGHTS)
    train = build_split(random.Random(TRAIN_SEED), split_bases["train"], N_TRAIN, "train", TRAIN_WEIGHTS)
    return {"train": train, "heldout": heldout}


def main() -> int:
    sets = build()
    for split, name in (("train", "train.jsonl"), ("heldout", "heldout.jsonl")):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for rec in sets[split]:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"{name}: {len(sets[split])} instructions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
