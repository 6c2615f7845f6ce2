"""ShapesWorld language: captions, their parser, VQA pairs and text-only documents.

Captions are templated but varied (openers, word order, synonyms, joiners). Every
template names each object's size, colour, shape and grid position in one clause without
commas, so :func:`parse_caption` reads any caption back to the scene's content exactly
(the captioning and generation evaluators rely on it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .scene import CELL_OF_POSITION, COLORS, DEFAULT_VOCAB, GRID, SHAPES, Scene, ShapeObject, Vocab

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen", "twenty")

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}

# Phrases that name a grid position; any of them may be used for that position.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top": ("at the top", "along the top edge", "at the top middle"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "left": ("on the left", "at the left side", "in the middle left"),
    "center": ("in the center", "in the middle", "at the centre"),
    "right": ("on the right", "at the right side", "in the middle right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "in the lower left"),
    "bottom": ("at the bottom", "along the bottom edge", "at the bottom middle"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "in the lower right"),
}
_PHRASE_TO_POSITION = {p: pos for pos, phrases in POSITION_PHRASES.items() for p in phrases}
_WORD_TO_SIZE = {w: s for s, words in SIZE_WORDS.items() for w in words}

# Openers ending in a colon take any object template; the others only noun phrases.
_OPENERS = ("", "There {is} {n} {shape_word}: ", "{N} {shape_word}: ", "This image shows {n} {shape_word}: ",
            "We see ", "A picture with ")
_NOUN_TEMPLATES = ("a {size} {color} {shape} {where}", "one {size} {color} {shape} {where}")
_OBJECT_TEMPLATES = _NOUN_TEMPLATES + ("{where} is a {size} {color} {shape}",)


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def object_phrase(o: ShapeObject, rng: np.random.Generator, noun_only: bool = False) -> str:
    """One comma-free clause naming an object's size, colour, shape and position."""
    template = _choice(rng, _NOUN_TEMPLATES if noun_only else _OBJECT_TEMPLATES)
    return template.format(size=_choice(rng, SIZE_WORDS[o.size]), color=o.color, shape=o.shape,
                           where=_choice(rng, POSITION_PHRASES[o.position]))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A varied English caption naming every object of a grid scene."""
    objects = list(scene.objects)
    if rng.random() < 0.5:  # reading order, otherwise random order
        objects.sort(key=lambda o: (o.row, o.col))
    else:
        objects = [objects[i] for i in rng.permutation(len(objects))]
    n = len(objects)
    opener = _choice(rng, _OPENERS)
    phrases = [object_phrase(o, rng, noun_only=bool(opener) and not opener.endswith(": ")) for o in objects]
    if n == 1:
        body = phrases[0]
    elif rng.random() < 0.5:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    else:
        body = "; ".join(phrases)
    opener = opener.format(n=number_word(n), N=number_word(n).capitalize(),
                           shape_word="shape" if n == 1 else "shapes", **{"is": "is" if n == 1 else "are"})
    text = opener + body
    return text[0].upper() + text[1:] + "."


@dataclass(frozen=True)
class ParsedObject:
    """An object mentioned in a caption or prompt; ``None`` for an attribute it does not name."""

    shape: str
    color: str | None
    size: str | None
    position: str | None

    @property
    def cell(self) -> tuple[int, int] | None:
        return CELL_OF_POSITION[self.position] if self.position else None


_NUMBER_OF_WORD = {w: k for k, w in enumerate(NUMBER_WORDS)} | {"a": 1, "an": 1}
_SHAPE_RE = re.compile(r"\b(?:(" + "|".join(_NUMBER_OF_WORD) + r"|\d+)\s+)?(?:(" + "|".join(_WORD_TO_SIZE)
                       + r")\s+)?(?:(" + "|".join(COLORS) + r")\s+)?(" + "|".join(SHAPES) + r")s?\b")
_PHRASES_LONGEST_FIRST = sorted(_PHRASE_TO_POSITION, key=len, reverse=True)
_CLAUSE_SPLIT = re.compile(r",\s*and\s+|,\s*|;\s*|\s+and\s+|:\s*")


def parse_caption(text: str) -> list[ParsedObject]:
    """Objects named in a caption or generation prompt, in order of mention.

    Each clause (split at commas, semicolons, colons and "and") contributes the shape it
    names with its size/colour words and the position phrase in the same clause.
    A number word or digit before a shape repeats it ("two red circles"). Clauses that
    name no shape are ignored, so free text around them does no harm.
    """
    objects = []
    for clause in _CLAUSE_SPLIT.split(text.lower().strip().rstrip(".")):
        position = None
        for phrase in _PHRASES_LONGEST_FIRST:
            if re.search(r"\b" + re.escape(phrase) + r"\b", clause):
                position = _PHRASE_TO_POSITION[phrase]
                clause = clause.replace(phrase, " ")
                break
        for number, size_word, color, shape in _SHAPE_RE.findall(clause):
            count = int(number) if number.isdigit() else _NUMBER_OF_WORD.get(number, 1)
            objects += [ParsedObject(shape, color or None, _WORD_TO_SIZE.get(size_word), position)] * count
    return objects


# ----------------------------------------------------------------------------- VQA


@dataclass(frozen=True)
class VQA:
    """A question about a scene, its exact answer and the candidate answers of its kind."""

    question: str
    answer: str
    choices: tuple[str, ...]
    kind: str  # "count" | "color" | "shape" | "position" | "relation"


COUNT_CHOICES = tuple(number_word(k) for k in range(0, GRID * GRID + 1))


def count_choices(vocab: Vocab = DEFAULT_VOCAB) -> tuple[str, ...]:
    """Answers of count questions: zero up to one shape per cell."""
    return tuple(number_word(k) for k in range(0, vocab.cells + 1))


def _unique_refs(scene: Scene) -> list[ShapeObject]:
    """Objects whose (colour, shape) pair is unique in the scene, so "the red circle" is unambiguous."""
    pairs = [(o.color, o.shape) for o in scene.objects]
    return [o for o in scene.objects if pairs.count((o.color, o.shape)) == 1]


def make_vqa(scene: Scene, rng: np.random.Generator, n: int = 4, vocab: Vocab = DEFAULT_VOCAB) -> list[VQA]:
    """``n`` questions about a grid scene of a world with ``vocab``, of random kinds, each
    with an exact answer; the choices of each kind are that world's (its colours, cells...)."""
    out = []
    objs = scene.objects
    for _ in range(n):
        kind = _choice(rng, ("count", "color", "shape", "position", "relation"))
        refs = _unique_refs(scene)
        if kind == "relation" and len(refs) < 2:
            kind = "position"
        if kind == "position" and not refs:
            kind = "count"
        if kind == "count":
            sub = rng.integers(3)
            if sub == 0:
                q, k = "How many shapes are there?", len(objs)
            elif sub == 1:
                c = _choice(rng, vocab.colors)
                q, k = f"How many {c} shapes are there?", sum(o.color == c for o in objs)
            else:
                s = _choice(rng, vocab.shapes)
                q, k = f"How many {s}s are there?", sum(o.shape == s for o in objs)
            out.append(VQA(q, number_word(k), count_choices(vocab), "count"))
        elif kind == "color":
            o = _choice(rng, objs)
            out.append(VQA(f"What color is the {o.shape} {_choice(rng, POSITION_PHRASES[o.position])}?",
                           o.color, vocab.colors, "color"))
        elif kind == "shape":
            o = _choice(rng, objs)
            out.append(VQA(f"What shape is {_choice(rng, POSITION_PHRASES[o.position])}?", o.shape, vocab.shapes,
                           "shape"))
        elif kind == "position":
            o = _choice(rng, refs)
            out.append(VQA(f"Where is the {o.color} {o.shape}?", o.position, vocab.positions, "position"))
        else:
            i, j = rng.choice(len(refs), size=2, replace=False)
            a, b = refs[int(i)], refs[int(j)]
            if rng.random() < 0.5:
                q, yes = f"Is the {a.color} {a.shape} left of the {b.color} {b.shape}?", a.col < b.col
            else:
                q, yes = f"Is the {a.color} {a.shape} above the {b.color} {b.shape}?", a.row < b.row
            out.append(VQA(q, "yes" if yes else "no", ("yes", "no"), "relation"))
    return out


def vqa_prompt(question: str) -> str:
    """The text that follows an image before its answer, in training documents and at evaluation."""
    return f"Question: {question} Answer:"


def vqa_document(items: list[VQA]) -> str:
    """The text of a VQA training document (it follows its image): each question and answer."""
    return " ".join(f"{vqa_prompt(v.question)} {v.answer}." for v in items)


def normalize_answer(answer: str) -> str:
    """Lower-case, strip punctuation and articles, map digits and position synonyms."""
    a = re.sub(r"[^a-z0-9 ]", " ", answer.lower())
    a = " ".join(w for w in a.split() if w not in ("the", "a", "an", "it", "is", "corner", "side"))
    if a.isdigit():
        a = number_word(int(a))
    a = a.replace("upper", "top").replace("lower", "bottom").replace("centre", "center")
    if a in ("middle", "middle center"):
        a = "center"
    if a in ("middle left", "middle right"):
        a = a.split()[1]
    return a


# ----------------------------------------------------------------------------- documents

def world_facts(vocab: Vocab = DEFAULT_VOCAB) -> tuple[str, ...]:
    """True sentences about a world with ``vocab`` (always 16, so draws do not depend on it)."""
    colors, shapes, g = vocab.colors, vocab.shapes, vocab.grid

    def listed(words):
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" and {words[-1]}"

    sizes = {"large": "A large shape is almost as wide as its cell.", "small": "A small shape is about half as wide "
             "as its cell."}
    size_fact = ("A large shape is almost as wide as its cell; a small shape is about half as wide."
                 if len(vocab.sizes) == 2 else sizes[vocab.sizes[0]])
    if g == 3:
        layout = ("The top left cell is above the left cell.",
                  "The center cell is right of the left cell and left of the right cell.",
                  "The bottom row is below the top row.")
    else:
        layout = ("The top left cell is above the bottom left cell.",
                  "The top right cell is right of the top left cell.",
                  "The bottom row is below the top row.")
    return (
        "A square has four corners and four equal sides.",
        "A triangle has three corners.",
        "A circle has no corners.",
        "A diamond is a square turned on its corner.",
        "The triangles in this world point up.",
        f"There are {len(colors)} colors: {listed(colors)}.",
        f"There are {len(shapes)} kinds of shapes: {listed([s + 's' for s in shapes])}.",
        f"Every picture is split into a grid of {number_word(g)} rows and {number_word(g)} columns.",
        "Each cell of the grid holds at most one shape.",
        *layout,
        size_fact,
        "The agent moves one step for each action: up, down, left or right, or it stays.",
        "An agent at the edge that is told to move into the wall stays where it is.",
        "Shapes in videos move in straight lines and bounce off the walls.",
    )


FACTS = world_facts()


def _arithmetic_sentence(rng: np.random.Generator, vocab: Vocab = DEFAULT_VOCAB, holdout=None,
                         shown: list | None = None) -> str:
    """An arithmetic sentence; with a ``holdout`` its colour and shape are redrawn until they make
    no held-out composition with the kinds ``shown`` (named earlier in the document; extended)."""
    a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
    c, s = _choice(rng, vocab.colors), _choice(rng, vocab.shapes)
    if holdout is not None:
        for _ in range(1000):
            if holdout.kind_allowed((c, s), shown or ()):
                break
            c, s = _choice(rng, vocab.colors), _choice(rng, vocab.shapes)
        else:
            raise RuntimeError(f"no colour and shape of {vocab} goes with {shown} outside the held-out compositions")
        if shown is not None:
            shown.append((c, s))
    templates = (
        f"{a} plus {b} equals {a + b}.",
        f"{number_word(a).capitalize()} {c} {s}s and {number_word(b)} more make {number_word(a + b)} {c} {s}s.",
        f"If there are {a + b} shapes and {b} are {c}, then {a} are not {c}.",
        f"{max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}.",
        f"{a} times {b} is {a * b}.",
    )
    return _choice(rng, templates)


def _scene_sentences(scene: Scene, rng: np.random.Generator, vocab: Vocab) -> list[str]:
    sents = [caption(scene, rng)]
    n = len(scene.objects)
    sents.append(f"In total there {'is' if n == 1 else 'are'} {number_word(n)} "
                 f"{'shape' if n == 1 else 'shapes'}.")
    for v in make_vqa(scene, rng, n=int(rng.integers(1, 3)), vocab=vocab):
        sents.append(f"Question: {v.question} Answer: {v.answer}.")
    return sents


def _agent_story(rng: np.random.Generator, lattice_size: int, holdout=None) -> list[str]:
    """The agent's dynamics on a ``lattice_size``-wide lattice in words: where it starts and
    where each action takes it (never from a held-out start cell of ``holdout``)."""
    from .video import apply_actions, sample_actions  # video does not import text: no cycle

    start = (int(rng.integers(lattice_size)), int(rng.integers(lattice_size)))
    while holdout is not None and start in holdout.start_cells:
        start = (int(rng.integers(lattice_size)), int(rng.integers(lattice_size)))
    actions = sample_actions(rng, int(rng.integers(3, 7)))
    path = apply_actions(start, actions, lattice_size)
    sents = [f"The agent starts in row {start[1] + 1}, column {start[0] + 1}."]
    for a, (before, after) in zip(actions, zip(path[:-1], path[1:])):
        if a == "stay":
            sents.append("It stays where it is.")
        elif tuple(before) == tuple(after):
            sents.append(f"It tries to move {a} but the wall stops it.")
        else:
            sents.append(f"It moves {a} to row {after[1] + 1}, column {after[0] + 1}.")
    return sents


def text_document(scene: Scene, rng: np.random.Generator, vocab: Vocab = DEFAULT_VOCAB,
                  lattice_size: int | None = None, holdout=None) -> str:
    """A short text-only document about a world with ``vocab``: a scene description,
    arithmetic, world facts, an agent story (on a ``lattice_size``-wide lattice; default the
    agent lattice of the scene's image size) or a mix. With a ``holdout``
    (:class:`~megafusion.data.shapes.holdout.Holdout`; the scene must hold none of its
    compositions) the arithmetic and the agent story avoid its compositions too."""
    if lattice_size is None:
        from .video import AgentLattice

        lattice_size = AgentLattice.for_image(scene.image_size).k
    facts = world_facts(vocab)
    kind = int(rng.integers(5))
    shown = [(o.color, o.shape) for o in scene.objects] if kind == 4 else []  # kinds the document names
    if kind == 0:
        sents = _scene_sentences(scene, rng, vocab)
    elif kind == 1:
        sents = [_arithmetic_sentence(rng, vocab, holdout, shown) for _ in range(int(rng.integers(3, 7)))]
    elif kind == 2:
        idx = rng.choice(len(facts), size=int(rng.integers(3, 6)), replace=False)
        sents = [facts[int(i)] for i in idx]
    elif kind == 3:
        sents = _agent_story(rng, lattice_size, holdout)
    else:
        sents = ([_choice(rng, facts)] + _scene_sentences(scene, rng, vocab)
                 + [_arithmetic_sentence(rng, vocab, holdout, shown)])
    return " ".join(sents)
