"""Command line client.

    python -m client query --user-id 42 --filter "category:comedy AND NOT language:en" -k 10
    python -m client query -i grpc -u 127.0.0.1:8001 --user-id 42 --weights 1,0,0
    python -m client query --user-id 42 --history 1017,33,4096    # newest first
    python -m client update --item-id 9000000000001 --embedding-from-item 123 \
        --features "category=comedy,language=en,creator=7,tags=funny|live"
    python -m client update --item-id 9000000000001 --retire
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from client import DEFAULT_MODEL, TASKS, Retriever
from client.catalog import DEFAULT_ITEMS_CSV, item_embedding, load_items, spell_item_features
from filtering.spelling import join_values


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-u", "--url", default=None,
                   help="server host:port (default 127.0.0.1:8000 for http, :8001 for grpc)")
    p.add_argument("-i", "--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help="retrieval (ensemble) or unified")
    p.add_argument("-t", "--client-timeout", type=float, default=None, help="seconds per call")
    p.add_argument("-v", "--verbose", action="store_true")


def _url(a) -> str:
    return a.url or ("127.0.0.1:8001" if a.protocol == "grpc" else "127.0.0.1:8000")


def parse_history(text: str) -> list:
    """`--history`: raw item ids separated by commas and/or spaces, newest first; an empty
    value is an empty history (sent as such: a user with none)."""
    ids = []
    for word in text.replace(",", " ").split():
        try:
            ids.append(int(word))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{word!r} is not an item id: give integers separated by commas or spaces, "
                "newest first, e.g. --history 1017,33,4096") from None
    return ids


def load_titles(items_csv: Path) -> dict:
    """item_id -> title from item_titles.csv next to items.csv (catalogs with titles)."""
    import csv

    path = Path(items_csv).with_name("item_titles.csv") if items_csv else None
    if path is None or not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {int(r["item_id"]): r["title"] for r in csv.DictReader(fh)}


def describe_history(history, titles: dict) -> str:
    """One line naming the history a query sent, with the items' titles when the catalog has
    them: `history (3, newest first): 1017 "Heat (1995)", 33, 4096`."""
    if not history:
        return "history: none (sent empty)"
    named = [f'{i} "{titles[i]}"' if i in titles else str(i) for i in history]
    return f"history ({len(history)}, newest first): " + ", ".join(named)


def print_results(result, user_id: int, filter: str, items_csv: Path, title: str = "",
                  tasks=TASKS, items=None, titles=None, history=None) -> None:
    """A table of results: rank, id, title (when the catalog has titles), score, one column
    per task, the item's features as filters spell them. `items` / `titles` may be passed
    already loaded (load_items, load_titles). `history`, when the query sent one, is shown
    above the table (a reader comparing results wants to see what they were based on)."""
    from rich.console import Console
    from rich.table import Table

    if items is None:
        items = load_items(items_csv) if items_csv and Path(items_csv).exists() else {}
    if titles is None:
        titles = load_titles(items_csv)
    table = Table(title=title or f"user {user_id}  filter {filter!r}  ({len(result.item_ids)} "
                                 "results)", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("item_id", justify="right")
    if titles:
        table.add_column("title", max_width=40)
    table.add_column("score", justify="right")
    for t in tasks:
        table.add_column(f"p({t})", justify="right")
    features = list(next(iter(items.values())).keys()) if items else []
    for f in features:
        table.add_column(f)
    for rank, (item, score, probs) in enumerate(
            zip(result.item_ids, result.scores, result.task_scores), 1):
        row = items.get(int(item), {})
        table.add_row(str(rank), str(item), *([titles.get(int(item), "")] if titles else []),
                      f"{score:.4f}", *(f"{p:.3f}" for p in probs),
                      *(join_values(row.get(f, [])) for f in features))
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console = Console(width=160)
    if history is not None:
        console.print(describe_history(history, titles), markup=False, highlight=False)
    console.print(table)


def _embedding(a) -> np.ndarray:
    if a.embedding is not None:
        return np.array([float(x) for x in a.embedding.replace(",", " ").split()], np.float32)
    if a.embedding_file is not None:
        path = Path(a.embedding_file)
        if path.suffix == ".npy":
            return np.load(path).astype(np.float32).reshape(-1)
        return np.array(path.read_text().replace(",", " ").split(), dtype=np.float32)
    return item_embedding(a.embedding_from_item, a.items_csv)


def _add_update_parser(sub) -> None:
    u = sub.add_parser("update", help="add, replace or retire an item in the fresh index",
                       description="Upsert (embedding + features) or retire one item. Returns "
                                   "once the server has written the update durably; the next "
                                   "query sees it.")
    _add_connection_flags(u)
    u.add_argument("--item-id", type=int, required=True, help="raw item id (new or indexed)")
    u.add_argument("--retire", action="store_true", help="stop serving the item")
    emb = u.add_mutually_exclusive_group()
    emb.add_argument("--embedding", help="D numbers separated by commas or spaces")
    emb.add_argument("--embedding-file", help=".npy of D float32, or a text file of D numbers")
    emb.add_argument("--embedding-from-item", type=int, metavar="ITEM_ID",
                     help="copy an indexed item's embedding (build/item_embeddings.npy)")
    feats = u.add_mutually_exclusive_group()
    feats.add_argument("--features", help='e.g. "category=comedy,language=en,creator=7,'
                                          'tags=funny|live"; every single-valued feature')
    feats.add_argument("--features-from-item", type=int, metavar="ITEM_ID",
                       help="copy an indexed item's features (items.csv)")
    u.add_argument("--items-csv", type=Path, default=DEFAULT_ITEMS_CSV,
                   help="catalog used by --*-from-item")


def _update(a, parser) -> int:
    from tritonclient.utils import InferenceServerException

    if not a.retire:
        if a.embedding is None and a.embedding_file is None and a.embedding_from_item is None:
            parser.error("update: an upsert needs --embedding, --embedding-file or "
                         "--embedding-from-item (or --retire)")
        if a.features is None and a.features_from_item is None:
            parser.error("update: an upsert needs --features or --features-from-item")
    try:
        with Retriever(_url(a), a.protocol, a.model, a.client_timeout, a.verbose) as r:
            if a.retire:
                row = r.retire_items([a.item_id])[0]
                print(f"retired item {a.item_id}" + (f" (fresh row {row})" if row >= 0 else ""))
            else:
                features = a.features or spell_item_features(a.features_from_item, a.items_csv)
                row = r.upsert_items([a.item_id], _embedding(a)[None, :], [features])[0]
                print(f"item {a.item_id} is in the fresh index (row {row}): {features}")
    except (KeyError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InferenceServerException as e:
        print(f"error: {e.message() if hasattr(e, 'message') else e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("query", help="top-k items for a user, optionally filtered")
    _add_connection_flags(q)
    q.add_argument("--user-id", type=int, required=True)
    q.add_argument("--filter", default="",
                   help='e.g. "category:comedy AND NOT language:en"; quote values with '
                        'spaces or operators: \'genres:"Science Fiction"\'')
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--weights", default=None,
                   help="Value Model weights, one per served task in order (the synthetic "
                        "world's click,like,share e.g. 1,2,4; MovieLens rated,liked,loved)")
    q.add_argument("--history", type=parse_history, default=None, metavar="ID[,ID...]",
                   help="the user's latest raw item ids, newest first (commas or spaces; at "
                        "most 1000; ids the server does not know are skipped), in place of "
                        "the history the server built from its logs; --history '' sends an "
                        "empty one (a user with none)")
    q.add_argument("--items-csv", type=Path, default=DEFAULT_ITEMS_CSV,
                   help="catalog used to show the items' features")
    _add_update_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "update":
        return _update(a, parser)

    from tritonclient.utils import InferenceServerException

    weights = [float(x) for x in a.weights.split(",")] if a.weights else None
    try:
        with Retriever(_url(a), a.protocol, a.model, a.client_timeout, a.verbose) as r:
            result = r.query(a.user_id, a.filter, a.k, weights, a.history)
            tasks = r.tasks()
    except InferenceServerException as e:
        print(f"error: {e.message() if hasattr(e, 'message') else e}", file=sys.stderr)
        return 2
    except ConnectionError as e:
        print(f"error: cannot reach the server at {_url(a)}: {e}", file=sys.stderr)
        return 2
    print_results(result, a.user_id, a.filter, a.items_csv, tasks=tasks, history=a.history)
    return 0


if __name__ == "__main__":
    sys.exit(main())
