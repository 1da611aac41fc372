"""Command line client.

    python -m client query --user-id 42 --filter "category:comedy AND NOT language:en" -k 10
    python -m client query -i grpc -u 127.0.0.1:8001 --user-id 42 --weights 1,0,0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client import DEFAULT_MODEL, TASKS, Retriever
from client.catalog import DEFAULT_ITEMS_CSV, load_items


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-u", "--url", default=None,
                   help="server host:port (default 127.0.0.1:8000 for http, :8001 for grpc)")
    p.add_argument("-i", "--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help="retrieval (ensemble) or unified")
    p.add_argument("-t", "--client-timeout", type=float, default=None, help="seconds per call")
    p.add_argument("-v", "--verbose", action="store_true")


def _url(a) -> str:
    return a.url or ("127.0.0.1:8001" if a.protocol == "grpc" else "127.0.0.1:8000")


def print_results(result, user_id: int, filter: str, items_csv: Path, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    items = load_items(items_csv) if items_csv and Path(items_csv).exists() else {}
    table = Table(title=title or f"user {user_id}  filter {filter!r}  ({len(result.item_ids)} "
                                 "results)", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("item_id", justify="right")
    table.add_column("score", justify="right")
    for t in TASKS:
        table.add_column(f"p({t})", justify="right")
    features = list(next(iter(items.values())).keys()) if items else []
    for f in features:
        table.add_column(f)
    for rank, (item, score, tasks) in enumerate(
            zip(result.item_ids, result.scores, result.task_scores), 1):
        row = items.get(int(item), {})
        table.add_row(str(rank), str(item), f"{score:.4f}", *(f"{p:.3f}" for p in tasks),
                      *("|".join(row.get(f, [])) for f in features))
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("query", help="top-k items for a user, optionally filtered")
    _add_connection_flags(q)
    q.add_argument("--user-id", type=int, required=True)
    q.add_argument("--filter", default="", help='e.g. "category:comedy AND NOT language:en"')
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--weights", default=None, help="task weights click,like,share e.g. 1,2,4")
    q.add_argument("--items-csv", type=Path, default=DEFAULT_ITEMS_CSV,
                   help="catalog used to show the items' features")
    a = parser.parse_args(argv)

    from tritonclient.utils import InferenceServerException

    weights = [float(x) for x in a.weights.split(",")] if a.weights else None
    try:
        with Retriever(_url(a), a.protocol, a.model, a.client_timeout, a.verbose) as r:
            result = r.query(a.user_id, a.filter, a.k, weights)
    except InferenceServerException as e:
        print(f"error: {e.message() if hasattr(e, 'message') else e}", file=sys.stderr)
        return 2
    except ConnectionError as e:
        print(f"error: cannot reach the server at {_url(a)}: {e}", file=sys.stderr)
        return 2
    print_results(result, a.user_id, a.filter, a.items_csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
