"""The `item_updates` model: adds, replaces and retires items in the fresh store.

A request carries one or more rows (up to the model's max_batch_size), each an upsert
(`item_id`, `embedding`, `features` spelled `category=comedy,language=en,creator=7,tags=a|b`)
or a retire (`item_id`, `retire` = true). Every row of a request is validated before anything
is written; a bad row rejects its request (INVALID_ARG, naming the row and the problem) and
leaves the other requests of the batch alone. The valid requests of a dynamic batch are
written as one commit group with one fsync (fresh/log.py), and every response leaves only
after that fsync: an acknowledged update survives a crash or restart. The retrieval models
see it at their next batch (fresh/store.py `refresh`).

Output per row: `fresh_row`, the item's row in the fresh index (-1 for a retire of an item
that has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from fresh.items import ItemUpdate, UpdateError
from fresh.store import FreshFull, FreshStore, fresh_dir_for
from serving.runners import Arrays, RequestError, Result, TensorSpec, decode

MODEL = "item_updates"
MAX_ROWS = 64  # rows per request: the config's max_batch_size


class ItemUpdateRunner:
    INPUTS = (TensorSpec("item_id", "INT64", (1,)),
              TensorSpec("embedding", "FP32", (-1,), optional=True),
              TensorSpec("features", "STRING", (1,), optional=True),
              TensorSpec("retire", "BOOL", (1,), optional=True))
    OUTPUTS = (TensorSpec("fresh_row", "INT64", (1,)),)

    def __init__(self, version_dir: Path, params: Optional[Dict[str, str]] = None):
        repository = Path(version_dir).resolve().parents[1]
        self.store = FreshStore(fresh_dir_for(repository), writable=True)

    def prepare(self, request: Arrays) -> List[ItemUpdate]:
        request = decode(request, self.INPUTS, max_rows=MAX_ROWS)
        ids = request["item_id"].reshape(-1)
        n = ids.shape[0]
        retire = request.get("retire")
        retire = np.zeros(n, bool) if retire is None else retire.reshape(n).astype(bool)
        emb, feats = request.get("embedding"), request.get("features")
        updates = []
        for r in range(n):
            where = f"row {r}: " if n > 1 else ""
            try:
                if retire[r]:
                    updates.append(self.store.header.retire(ids[r]))
                    continue
                if emb is None or feats is None:
                    raise UpdateError("an upsert needs `embedding` and `features` "
                                      "(or `retire` = true)")
                text = feats.reshape(n)[r]
                text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
                updates.append(self.store.header.upsert(ids[r], emb.reshape(n, -1)[r], text))
            except (UpdateError, UnicodeDecodeError) as e:
                raise RequestError(where + str(e)) from None
        return updates

    def run(self, requests: List[Arrays]) -> List[Result]:
        results: List[Result] = [RequestError("internal: no result")] * len(requests)
        prepared, index = [], []
        for i, req in enumerate(requests):
            try:
                prepared.append(self.prepare(req))
                index.append(i)
            except RequestError as e:
                results[i] = e
        if prepared:
            for i, rows in zip(index, self.store.write(prepared)):
                if isinstance(rows, FreshFull):
                    results[i] = RequestError(str(rows))
                else:
                    results[i] = {"fresh_row": np.array(rows, dtype=np.int64).reshape(-1, 1)}
        return results


RUNNERS = {MODEL: ItemUpdateRunner}  # for serving/python_backend.py make_model(MODEL, __name__)
