"""Vocabularies: guided presets, the concept list and how it is built, the loader and its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ovseg.export import build_concepts
from ovseg.runtime.pipeline import vocabulary
from ovseg.runtime.pipeline.vocabulary import (
    CONCEPT_TEMPLATES,
    DEFAULT_CONCEPTS,
    GUIDED_TEMPLATES,
    PRESETS,
    VocabularyError,
    load_vocabulary,
    parse_class_list,
    prompts_for,
)

from assertions import one_line

PRESET_SIZES = {
    "voc20": 20,
    "voc21": 21,
    "context59": 59,
    "context60": 60,
    "ade150": 150,
    "cocostuff171": 171,
    "cityscapes19": 19,
}
WORDNET_DIR = Path("/usr/share/wordnet")


# --- presets -----------------------------------------------------------------


@pytest.mark.parametrize("preset, size", PRESET_SIZES.items())
def test_preset_sizes(preset: str, size: int) -> None:
    names = load_vocabulary(preset)
    assert len(names) == size
    assert all(name and name == name.strip() for name in names)


@pytest.mark.parametrize(
    "preset, index, name",
    [
        ("voc20", 0, "aeroplane"),
        ("voc20", 19, "tvmonitor"),
        ("voc21", 0, "background"),
        ("voc21", 15, "person"),
        ("context59", 0, "aeroplane"),
        ("context59", 49, "diningtable"),
        ("context60", 0, "background"),
        ("context60", 59, "wood"),
        ("ade150", 0, "wall"),
        ("ade150", 7, "bed"),  # "bed " in the source list
        ("ade150", 149, "flag"),
        ("cocostuff171", 0, "person"),
        ("cocostuff171", 79, "toothbrush"),
        ("cocostuff171", 170, "wood"),
        ("cityscapes19", 0, "road"),
        ("cityscapes19", 18, "bicycle"),
    ],
)
def test_preset_entries_at_known_positions(preset: str, index: int, name: str) -> None:
    assert load_vocabulary(preset)[index] == name


def test_background_presets_extend_the_plain_ones() -> None:
    assert load_vocabulary("voc21") == ["background", *load_vocabulary("voc20")]
    assert load_vocabulary("context60") == ["background", *load_vocabulary("context59")]


def test_every_preset_file_ships_with_the_package() -> None:
    assert set(PRESETS) == {*PRESET_SIZES, DEFAULT_CONCEPTS}
    for path in PRESETS.values():
        assert Path(path).is_file()
        assert Path(path).parent == vocabulary.VOCAB_DIR


# --- the concept list --------------------------------------------------------


def test_concepts_are_many_unique_lower_case_names() -> None:
    names = load_vocabulary(DEFAULT_CONCEPTS)
    assert len(names) >= 10_000
    assert len(set(names)) == len(names)
    assert all(name and name == name.strip() and name == name.lower() and "_" not in name for name in names)
    assert names == sorted(names)


def test_concepts_contain_the_coco_classes() -> None:
    concepts = set(load_vocabulary(DEFAULT_CONCEPTS))
    coco = load_vocabulary("cocostuff171")
    assert set(coco[:80]) <= concepts  # the thing classes, verbatim
    stuff = {name for line in coco[80:] for name in build_concepts.class_list_names(line)}
    assert stuff <= concepts
    assert {"brick wall", "floor", "window blind"} <= concepts


def test_committed_concepts_are_what_the_script_builds() -> None:
    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip(
            "system package wordnet-base is not installed (apt-get install wordnet-base), so concepts.txt cannot be rebuilt here"
        )
    built = build_concepts.render(build_concepts.build_concepts(WORDNET_DIR))
    assert Path(PRESETS[DEFAULT_CONCEPTS]).read_text(encoding="utf-8") == built


def test_every_concept_source_names_its_origin() -> None:
    sources = sorted(build_concepts.SOURCES_DIR.glob("*.txt"))
    assert len(sources) == 5
    for path in sources:
        assert path.read_text(encoding="utf-8").startswith("# source: ")
    sizes = {path.stem: len(build_concepts.read_class_list(path)) for path in sources}
    assert sizes == {"cocostuff171": 171, "ade847": 847, "lvis1203": 1203, "objects365": 365, "openimages_boxable": 601}


@pytest.mark.parametrize(
    "line, names",
    [
        ("person", ["person"]),
        ("building, edifice", ["building"]),
        ("cabinet/shelf", ["cabinet", "shelf"]),
        ("bat_(animal)", ["bat"]),
        ("Band_Aid", ["band aid"]),
        ("Christmas tree", ["christmas tree"]),
        ("floor-other", ["floor"]),
        ("mirror-stuff", ["mirror"]),
        ("wall-brick", ["brick wall"]),
        ("window-blind", ["window blind"]),
    ],
)
def test_class_list_names_are_readable(line: str, names: list[str]) -> None:
    assert build_concepts.class_list_names(line) == names


def write_fake_wordnet(directory: Path) -> Path:
    """A WordNet database of a few synsets, in the wndb(5) format of data.noun and cntlist.rev."""
    directory.mkdir()
    data_noun = [
        "  1 licence header lines start with two spaces",
        "00001740 03 n 01 entity 0 001 ~ 00001930 n 0000 | that which exists",
        "00001930 03 n 01 physical_entity 0 001 @ 00001740 n 0000 | an entity that has physical existence",
        "00002000 06 n 02 mug 0 coffee_mug 0 001 @ 00001930 n 0000 | a drinking cup",
        "00002100 06 n 01 spark_plug 0 001 @ 00002000 n 0000 | untagged compound of common words",
        "00002200 06 n 01 Eiffel_Tower 0 001 @ 00001930 n 0000 | a proper noun",
        "00002300 06 n 01 mug_of_hot_tea 0 001 @ 00001930 n 0000 | four words",
        "00002400 06 n 01 b52 0 001 @ 00001930 n 0000 | a lemma with a digit",
        "00002500 18 n 01 spark_engineer 0 001 @ 00001930 n 0000 | an untagged compound naming a person",
        "00002600 09 n 01 idea 0 001 @ 00001740 n 0000 | abstract, not a physical entity",
        "00002700 06 n 01 rare_widget 0 001 @ 00001930 n 0000 | untagged compound of uncommon words",
        "00002800 10 n 01 memo 0 001 @ 00001930 n 0000 | physical but not in a visual lexicographer file",
        "00002900 06 n 01 badword 0 001 @ 00001930 n 0000 | a tagged artifact sense",
        "00003000 18 n 01 badword 1 001 @ 00001930 n 0000 | offensive term for a person",
    ]
    cntlist = [
        "mug%1:06:00:: 1 5",
        "coffee_mug%1:06:00:: 1 1",
        "eiffel_tower%1:06:00:: 1 9",
        "mug_of_hot_tea%1:06:00:: 1 9",
        "b52%1:06:00:: 1 9",
        "idea%1:09:00:: 1 50",
        "memo%1:10:00:: 1 9",
        "badword%1:06:00:: 1 3",
        "spark%1:19:00:: 1 10",
        "plug%1:06:00:: 1 10",
        "engineer%1:18:00:: 1 10",
        "rare%5:00:00:uncommon:00 1 1",
    ]
    (directory / "data.noun").write_text("\n".join(data_noun) + "\n", encoding="utf-8")
    (directory / "cntlist.rev").write_text("\n".join(cntlist) + "\n", encoding="utf-8")
    return directory


def test_build_concepts_filters_wordnet_and_merges_class_lists(tmp_path: Path) -> None:
    wordnet = write_fake_wordnet(tmp_path / "wordnet")
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "demo.txt").write_text("# source: a test\nbuilding-other\nbat_(animal)\nmug\n", encoding="utf-8")
    names = build_concepts.build_concepts(wordnet, sources)
    assert names == ["bat", "building", "coffee mug", "mug", "spark plug"]


def test_build_concepts_main_writes_the_rendered_list(tmp_path: Path) -> None:
    wordnet = write_fake_wordnet(tmp_path / "wordnet")
    out = tmp_path / "out" / "concepts.txt"
    assert build_concepts.main(["--wordnet", str(wordnet), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert load_vocabulary(str(out)) == build_concepts.build_concepts(wordnet)


def test_build_concepts_without_wordnet_says_to_install_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_concepts.main(["--wordnet", str(tmp_path / "missing"), "--out", str(tmp_path / "c.txt")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert "apt-get install wordnet-base" in error
    assert not (tmp_path / "c.txt").exists()


# --- loading files -----------------------------------------------------------


def write(path: Path, content: str | bytes) -> str:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return str(path)


def test_file_lines_are_stripped_deduplicated_and_comments_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path / "v.txt", "# my classes\n\n  cat \ndog\n\t# indented comment\ncat\nhot dog\n   \nsofa, couch\n"
    )
    assert load_vocabulary(path) == ["cat", "dog", "hot dog", "sofa, couch"]


def test_file_with_bom_crlf_and_non_ascii_names(tmp_path: Path) -> None:
    path = write(tmp_path / "v.txt", "\ufeffcafé table\r\nçà\r\nno final newline")
    assert load_vocabulary(path) == ["café table", "çà", "no final newline"]


def test_a_file_named_like_no_preset_is_loaded(tmp_path: Path) -> None:
    path = write(tmp_path / "voc20", "only\n")
    assert load_vocabulary(path) == ["only"]


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(VocabularyError) as excinfo:
        load_vocabulary("voc19")
    one_line(excinfo, "voc19", "one class name per line", *PRESETS)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError) as excinfo:
        load_vocabulary(str(tmp_path))
    one_line(excinfo, "not a file", "text file")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "v.txt", "cat\n")

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(VocabularyError) as excinfo:
        load_vocabulary(path)
    one_line(excinfo, "cannot read", "Permission denied", "permissions")


@pytest.mark.parametrize("content", ["", "\n\n  \n", "# only a comment\n#another\n"])
def test_file_without_names(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "v.txt", content)
    with pytest.raises(VocabularyError) as excinfo:
        load_vocabulary(path)
    one_line(excinfo, "no class names", "one class name per line")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = write(tmp_path / "v.txt", "cat\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(VocabularyError) as excinfo:
        load_vocabulary(path)
    one_line(excinfo, "not UTF-8", "offset 7", "save it as UTF-8")


# --- --classes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, names",
    [
        ("cat", ["cat"]),
        ("cat,dog,sofa", ["cat", "dog", "sofa"]),
        (" cat , hot dog ,, sofa,", ["cat", "hot dog", "sofa"]),
        ("cat,dog,cat", ["cat", "dog"]),
    ],
)
def test_parse_class_list(text: str, names: list[str]) -> None:
    assert parse_class_list(text) == names


@pytest.mark.parametrize("text", ["", " ", ",", " , ,, "])
def test_parse_class_list_without_names(text: str) -> None:
    with pytest.raises(VocabularyError) as excinfo:
        parse_class_list(text)
    one_line(excinfo, "no class names", "separated by commas")


# --- prompts -----------------------------------------------------------------


def test_guided_templates_are_pixelclips_eight() -> None:
    assert len(GUIDED_TEMPLATES) == 8
    assert len(set(GUIDED_TEMPLATES)) == 8
    assert "A photo of a {} in the scene" in GUIDED_TEMPLATES
    assert all(template.count("{}") == 1 and "{article}" not in template for template in GUIDED_TEMPLATES)


def test_prompts_for() -> None:
    assert prompts_for("traffic light", CONCEPT_TEMPLATES) == ["a photo of a traffic light."]
    prompts = prompts_for("cat", GUIDED_TEMPLATES)
    assert len(prompts) == len(GUIDED_TEMPLATES)
    assert prompts[0] == "itap of a cat." and prompts[-1] == "A photo of a cat in the scene"
    assert prompts_for("{odd}", ["a {}."]) == ["a {odd}."]


def test_template_without_slot() -> None:
    with pytest.raises(VocabularyError) as excinfo:
        prompts_for("cat", ["a photo"])
    one_line(excinfo, "{}", "add one")


# --- dependency rule ---------------------------------------------------------


def test_importing_the_vocabulary_does_not_import_torch() -> None:
    code = (
        "import sys, ovseg.runtime.pipeline.vocabulary as v; v.load_vocabulary('concepts'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'transformers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
