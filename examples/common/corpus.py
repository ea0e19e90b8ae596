"""A corpus the examples generate themselves, so nothing is downloaded.

Each document follows one person and their pet through a few sentences, some
with small sums. The text is regular enough that a tiny model's loss falls
quickly, and consecutive sentences share names, so next-sentence prediction
is learnable. The same seed always gives the same corpus.
"""

from __future__ import annotations

import random

NAMES = ["anna", "ben", "carl", "dora", "emil", "fay", "gus", "hana", "ivan", "june", "kai", "lena",
         "mia", "noah", "olga", "paul"]
ANIMALS = ["cat", "dog", "fox", "owl", "frog", "goat", "duck", "horse", "mouse", "tiger"]
COLOURS = ["red", "blue", "green", "grey", "white", "black", "brown", "yellow"]
PLACES = ["garden", "forest", "kitchen", "barn", "park", "river", "school", "market"]
FOODS = ["apples", "bread", "fish", "corn", "cheese", "rice", "carrots", "seeds"]
MOODS = ["happy", "sleepy", "hungry", "calm", "busy", "brave", "quiet", "glad"]


def _document(rng: random.Random) -> list[str]:
    name, animal, colour = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(COLOURS)
    place, food = rng.choice(PLACES), rng.choice(FOODS)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    sentences = [
        f"{name} has a {colour} {animal}.",
        f"the {animal} lives in the {place} with {name}.",
        f"every morning {name} gives the {animal} some {food}.",
        f"{name} counts the {food}: {a} plus {b} is {a + b}.",
        f"today the {animal} is {rng.choice(MOODS)} and {name} is {rng.choice(MOODS)}.",
        f"{name} and the {colour} {animal} walk to the {rng.choice(PLACES)}.",
        f"there {name} finds {b} more {food}, so now there are {a + 2 * b}.",
        f"at night the {animal} sleeps and {name} reads a book.",
    ]
    # Keep the story's order but vary its length.
    keep = sorted(rng.sample(range(1, len(sentences)), rng.randint(4, len(sentences) - 1)))
    return [sentences[0]] + [sentences[i] for i in keep]


def make_documents(num_docs: int = 2000, seed: int = 0) -> list[list[str]]:
    """Takes a document count and a seed; returns that many documents, each a list of sentences."""
    if num_docs < 1:
        raise ValueError(f"num_docs must be at least 1 (got {num_docs})")
    rng = random.Random(seed)
    return [_document(rng) for _ in range(num_docs)]


def corpus_text(num_docs: int = 2000, seed: int = 0) -> str:
    """Takes a document count and a seed; returns the documents as one text, one per line."""
    return "\n".join(" ".join(doc) for doc in make_documents(num_docs, seed)) + "\n"
