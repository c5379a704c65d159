"""Build the default concept vocabulary for guidance-free mode.

    python -m ovseg.export.build_concepts [--wordnet /usr/share/wordnet] [--out runtime/vocab/concepts.txt]

The vocabulary is the union of
  * WordNet 3.0 noun lemmas below physical_entity.n.01, in the lexicographer
    files that hold visible things (artifacts, animals, plants, food, ...),
    used at least once in WordNet's sense-tagged corpus (tag count > 0), and
    without proper nouns, digits, more than 3 words or a sense glossed as
    offensive;
  * the class names of the detection/segmentation data sets listed in
    export/concept_sources/ (COCO-Stuff, ADE20K-847, LVIS, Objects365,
    Open Images), which are kept even when WordNet would filter them.
WordNet is read straight from its database files (Debian's wordnet-base), so
the output depends only on that package and this repository.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ovseg.cli import run_cli
from ovseg.export.errors import ExportError

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
PACKAGE_DIR = Path(__file__).resolve().parent
SOURCES_DIR = PACKAGE_DIR / "concept_sources"
DEFAULT_OUT = PACKAGE_DIR.parent / "runtime" / "vocab" / "concepts.txt"

ROOT_LEMMA = "physical_entity"
# Noun lexicographer files (WordNet lexnames(5)) whose synsets are things a camera can see.
VISUAL_LEXFILES = {
    5: "noun.animal",
    6: "noun.artifact",
    8: "noun.body",
    13: "noun.food",
    15: "noun.location",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    27: "noun.substance",
}
MAX_WORDS = 3
LEMMA_PATTERN = re.compile(r"[a-z][a-z' -]*")
# Glosses that mark a sense as a slur or an obscenity; a lemma with any such sense is dropped.
OFFENSIVE_GLOSS = re.compile(
    r"\bethnic slur\b"
    r"|\b(?:offensive|disparaging|derogatory|contemptuous|obscene|vulgar)(?: and \w+)? (?:term|name|word|slang)s?\b"
    r"|\((?:sometimes )?(?:offensive|disparaging|derogatory|obscene|vulgar)\)",
    re.IGNORECASE,
)
# An untagged compound ("spark plug") is kept when each of its words is a common word:
# a single-word lemma tagged at least this often in WordNet's sense-tagged corpus.
COMMON_WORD_MIN_TAGS = 5
PERSON_LEXFILE = 18  # untagged compounds naming people are roles, not things a camera can tell apart
# COCO-Stuff names stuff "<surface>-<material>" ("wall-brick" -> "brick wall") and "<thing>-other"/"-stuff".
COCO_STUFF_SURFACES = ("wall", "floor", "ceiling")
COCO_STUFF_RENAMES = {"window-blind": "window blind"}


@dataclass(frozen=True)
class Synset:
    offset: int
    lexfile: int
    lemmas: tuple[tuple[str, int], ...]  # (lemma as written in WordNet, lex_id)
    hypernyms: tuple[int, ...]  # ordinary hypernyms only; instance-of links are left out
    gloss: str


def parse_data_noun(path: Path) -> dict[int, Synset]:
    """Parse WordNet's data.noun (format: wndb(5)); licence header lines start with spaces."""
    synsets: dict[int, Synset] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith(" "):
                continue
            fields, _, gloss = line.partition(" | ")
            tokens = fields.split()
            offset, lexfile = int(tokens[0]), int(tokens[1])
            word_count = int(tokens[3], 16)
            words = tokens[4 : 4 + 2 * word_count]
            lemmas = tuple((words[i], int(words[i + 1], 16)) for i in range(0, len(words), 2))
            pointer_at = 4 + 2 * word_count
            pointer_count = int(tokens[pointer_at])
            pointers = tokens[pointer_at + 1 : pointer_at + 1 + 4 * pointer_count]
            hypernyms = tuple(
                int(pointers[i + 1])
                for i in range(0, len(pointers), 4)
                if pointers[i] == "@" and pointers[i + 2] == "n"
            )
            synsets[offset] = Synset(offset, lexfile, lemmas, hypernyms, gloss.strip())
    return synsets


def read_tag_counts(path: Path) -> dict[str, int]:
    """Sense key -> how often the sense was tagged in the Semantic Concordance (cntlist.rev)."""
    counts: dict[str, int] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            sense_key, _sense_number, count = line.split()
            counts[sense_key] = int(count)
    return counts


def find_root(synsets: dict[int, Synset], lemma: str) -> int:
    for synset in synsets.values():
        if any(word == lemma for word, _ in synset.lemmas):
            return synset.offset
    raise ValueError(f"WordNet has no noun synset with lemma {lemma!r}")


def descendants(synsets: dict[int, Synset], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for synset in synsets.values():
        for parent in synset.hypernyms:
            children.setdefault(parent, []).append(synset.offset)
    found, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def readable(lemma: str) -> str:
    return lemma.replace("_", " ")


def wordnet_concepts(wordnet_dir: Path) -> set[str]:
    """Visual WordNet nouns: tagged senses, plus untagged compounds of common words (not people). No proper nouns
    (capitals), digits, odd characters, long phrases or lemmas with an offensive sense."""
    synsets = parse_data_noun(wordnet_dir / "data.noun")
    tag_counts = read_tag_counts(wordnet_dir / "cntlist.rev")
    common: Counter[str] = Counter()  # single-word lemma (any part of speech) -> its tag count summed over senses
    for key, count in tag_counts.items():
        if "_" not in (lemma := key.partition("%")[0]):
            common[lemma] += count
    offensive = {readable(w).lower() for s in synsets.values() if OFFENSIVE_GLOSS.search(s.gloss) for w, _ in s.lemmas}
    names: set[str] = set()
    for offset in descendants(synsets, find_root(synsets, ROOT_LEMMA)):
        synset = synsets[offset]
        if synset.lexfile not in VISUAL_LEXFILES:
            continue
        for word, lex_id in synset.lemmas:
            name = readable(word)
            words = name.split()
            if not LEMMA_PATTERN.fullmatch(name) or len(words) > MAX_WORDS or name in offensive:
                continue
            tagged = tag_counts.get(f"{word.lower()}%1:{synset.lexfile:02d}:{lex_id:02d}::", 0) > 0  # 1: a noun
            compound = len(words) > 1 and all(common[w] >= COMMON_WORD_MIN_TAGS for w in words)
            if tagged or (synset.lexfile != PERSON_LEXFILE and compound):
                names.add(name)
    return names


def class_list_names(line: str) -> list[str]:
    """Readable concept names from one line of a data set's class list.

    "building, edifice" (ADE) -> first name; "cabinet/shelf" (Objects365) -> both;
    "bat_(animal)" (LVIS) -> "bat"; "wall-brick" / "floor-other" (COCO-Stuff) -> "brick wall" / "floor";
    other hyphens stay ("t-shirt").
    """
    first = line.split(", ")[0]
    names = []
    for part in first.split("/"):
        name = re.sub(r"\(.*?\)", "", part.lower()).replace("_", " ")
        head, dash, tail = name.partition("-")
        if dash and tail in ("other", "stuff"):
            name = head
        elif dash and head in COCO_STUFF_SURFACES:
            name = f"{tail} {head}"
        name = COCO_STUFF_RENAMES.get(name, name)
        name = " ".join(name.split())
        if name:
            names.append(name)
    return names


def read_class_list(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build_concepts(wordnet_dir: Path = DEFAULT_WORDNET_DIR, sources_dir: Path = SOURCES_DIR) -> list[str]:
    missing = [name for name in ("data.noun", "cntlist.rev") if not (wordnet_dir / name).is_file()]
    if missing:
        raise ExportError(
            f"WordNet database not found in {wordnet_dir} (missing {', '.join(missing)}): "
            "run `apt-get install wordnet-base` or pass --wordnet DIR"
        )
    lists = [read_class_list(path) for path in sorted(sources_dir.glob("*.txt"))]
    return sorted(
        wordnet_concepts(wordnet_dir) | {name for lines in lists for line in lines for name in class_list_names(line)}
    )


def render(names: list[str]) -> str:
    header = (
        f"# ovseg default concept vocabulary: {len(names)} names, one per line.\n"
        "# Generated by `python -m ovseg.export.build_concepts` from WordNet 3.0 (wordnet-base)\n"
        "# and export/concept_sources/*.txt; do not edit by hand.\n"
    )
    return header + "".join(f"{name}\n" for name in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ovseg.export.build_concepts", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wordnet", type=Path, default=DEFAULT_WORDNET_DIR, help="WordNet dict dir (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output file (default: runtime/vocab/concepts.txt)"
    )
    args = parser.parse_args(argv)
    return run_cli(parser.prog, functools.partial(write_concepts, args))


def write_concepts(args: argparse.Namespace) -> int:
    names = build_concepts(args.wordnet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(names), encoding="utf-8")
    print(f"wrote {len(names)} concepts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
