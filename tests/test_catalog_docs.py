"""docs/catalog.md's worked example is true: its files build, the indexed items.csv it shows is
what the build writes, its filters parse against the built schema, and the messages it quotes
are the ones given."""

import csv
import re
from pathlib import Path

import pytest

from builder.__main__ import main
from catalog import read_catalog
from filtering.expression import FilterError, parse_plan
from world.schema import Schema

DOC = Path(__file__).resolve().parents[1] / "docs" / "catalog.md"
# a file of the example: a line `**shop/<name>**`, a blank line, a fenced block
EXAMPLE_FILE = re.compile(r"^\*\*shop/([\w.]+)\*\*\n\n```\w*\n(.*?)^```", re.M | re.S)


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def worked_example() -> str:
    text = doc_text()
    return text[text.index("## Worked example"):]


def example_files() -> dict:
    files = dict(EXAMPLE_FILE.findall(worked_example()))
    assert set(files) == {"catalog.toml", "items.csv", "interactions.csv"}
    return files


def fenced_after(text: str, marker: str) -> str:
    """The first fenced block after `marker`."""
    start = text.index(marker)
    m = re.compile(r"^```\w*\n(.*?)^```", re.M | re.S).search(text, start)
    return m.group(1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("catalog_docs")
    shop = tmp / "shop"
    shop.mkdir()
    for name, content in example_files().items():
        (shop / name).write_text(content, encoding="utf-8")
    return shop, tmp


def test_the_example_builds_into_the_items_csv_shown(built, capsys):
    shop, tmp = built
    rc = main(["--catalog", str(shop), "--repository", str(tmp / "repo"),
               "--items-csv", str(tmp / "items.csv")])
    assert rc == 0
    printed = capsys.readouterr().out
    shown = fenced_after(worked_example(), "Build it (")
    for line in shown.splitlines()[1:3]:  # the catalog summary
        assert line in printed
    with open(tmp / "items.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["item_id", "brand", "category", "tags"]  # price is not a feature
    shown_csv = fenced_after(worked_example(), "The indexed catalog")
    documented = list(csv.reader(shown_csv.splitlines()))
    assert rows[0] == documented[0]
    # index order may differ between builds; the rows themselves may not
    assert sorted(rows[1:]) == sorted(documented[1:])
    assert {r[0] for r in rows[1:]} == {str(i) for i in range(1001, 1009)}
    by_id = {r[0]: r for r in rows[1:]}
    assert by_id["1005"][1:] == ['"Procter & Gamble"', '"Baby & Kids"', ""]


def test_the_docs_filters_parse_against_the_built_schema(built):
    shop, tmp = built
    if not (tmp / "repo" / "filter" / "1" / "schema.json").exists():
        main(["--catalog", str(shop), "--repository", str(tmp / "repo"),
              "--items-csv", str(tmp / "items.csv")])
    schema = Schema.from_json((tmp / "repo" / "filter" / "1" / "schema.json").read_text())
    filters = re.findall(r"--filter '([^']*)'", worked_example())
    assert len(filters) == 3
    filters += ['brand:"Procter & Gamble"', 'category:"Home Care" AND tags:refill']
    for text in filters:
        parse_plan(text, schema)
    errors = doc_text()[doc_text().index("## Errors"):doc_text().index("## Worked example")]
    with pytest.raises(FilterError) as unclosed:
        parse_plan('brand:"Procter & Gamble', schema)
    assert str(unclosed.value) in errors
    with pytest.raises(FilterError) as unquoted:
        parse_plan("brand:Procter & Gamble", schema)
    assert " ".join(str(unquoted.value).split()) in " ".join(errors.split())


def test_the_inferred_schema_is_the_one_shown(built):
    shop, tmp = built
    bare = tmp / "inferred" / "shop"
    bare.mkdir(parents=True)
    for name in ("items.csv", "interactions.csv"):
        (bare / name).write_text((shop / name).read_text())
    echoed = []
    read_catalog(bare, echo=echoed.append)
    shown = fenced_after(doc_text(), "For the [worked example]")
    assert echoed == [shown.rstrip("\n") + "\n"]
