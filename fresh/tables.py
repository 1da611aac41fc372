"""The serving side of the store: the `FreshItems` tensors a runner passes to its model.

Each model process (filter, ann, scorer, aggregator, unified) owns one `FreshView`. Before each
batch, `current()` applies what the log gained since the last batch (one `stat` when nothing
did) and returns the tables as tensors, or None while the store holds no update at all, so that
an index without fresh items runs exactly the main-only graph.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fresh.store import LOG_NAME, FreshStore, fresh_dir_for
from stages.fresh import FreshItems
from world.schema import Schema

log = logging.getLogger(__name__)


class FreshView:
    """Args:
        directory: the store (fresh/store.py).
        module: the model; when it exports `live_main_words(hidden_ids)` (the filter and
            `unified`), the bitmap of main rows still served is recomputed whenever the set of
            retired/replaced ids changes. Other stages do not read it.
        schema: the catalog schema the model parses filters with; must be the store's.
    """

    def __init__(self, directory: Path, module=None, schema: Optional[Schema] = None,
                 device: torch.device = torch.device("cpu")):
        self.store = FreshStore(directory)
        self._device = device  # the module's: live_main_words runs there
        header = self.store.header
        if schema is not None and schema.to_json() != header.feature_schema.to_json():
            raise RuntimeError(f"fresh store {directory} was made for another catalog schema; "
                               "rebuild the repository (python -m builder)")
        self._live_main_words = getattr(module, "live_main_words", None)
        self._column_start = torch.from_numpy(header.column_start)
        self._items: Optional[FreshItems] = None
        self._version = -1
        self._hidden: Optional[np.ndarray] = None
        self._main_live = torch.zeros(0, dtype=torch.int64)

    @staticmethod
    def for_model(version_dir: Path, module, schema: Optional[Schema] = None,
                  device: torch.device = torch.device("cpu")) -> Optional[FreshView]:
        """The view of the store next to the repository holding `version_dir`
        (<repository>/<model>/<version>) for a model whose forward takes `fresh`; None when
        there is no store or the model does not take fresh items (e.g. the baseline's)."""
        if not takes_fresh(module):
            return None
        directory = fresh_dir_for(Path(version_dir).resolve().parents[1])
        if not (directory / LOG_NAME).exists():
            log.warning("no fresh-item store at %s: serving the main index only", directory)
            return None
        return FreshView(directory, module, schema, device)

    def current(self) -> Optional[FreshItems]:
        """The tables as of now (None: the store holds no update)."""
        self.store.refresh()
        if self.store.version == self._version:
            return self._items
        self._version = self.store.version
        s = self.store
        if s.updates == 0:
            self._items = None
            return None
        hidden = s.hidden_ids()
        if self._live_main_words is not None and (
                self._hidden is None or not np.array_equal(hidden, self._hidden)):
            self._main_live = self._live_main_words(
                torch.from_numpy(hidden).to(self._device)).cpu()
            self._hidden = hidden
        # views of the store's arrays: refresh() updates them in place between batches
        self._items = FreshItems(torch.from_numpy(s.embeddings), torch.from_numpy(s.features),
                                 self._column_start, torch.from_numpy(s.item_ids),
                                 torch.from_numpy(s.live), self._main_live)
        return self._items


def takes_fresh(module) -> bool:
    """Whether `module`'s forward (scripted or eager) has a `fresh` argument."""
    forward = getattr(module, "forward", None)
    schema = getattr(forward, "schema", None)
    if schema is not None:
        return any(a.name == "fresh" for a in schema.arguments)
    return forward is not None and "fresh" in inspect.signature(forward).parameters
