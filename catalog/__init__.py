"""A user's catalog directory (items, interactions, users, vectors) as arrays the builder and
training read: the format is docs/catalog.md, `catalog.toml` is read by catalog/spec.py, the
tables by catalog/tables.py and catalog/read.py, MovieLens directories by catalog/movielens.py.
"""

from catalog.errors import CatalogError
from catalog.read import CatalogSource, read_catalog

__all__ = ["CatalogError", "CatalogSource", "read_catalog"]
