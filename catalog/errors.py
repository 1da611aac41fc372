"""The one error type of catalog reading: what is wrong, where (file, row, column)."""


class CatalogError(ValueError):
    """A catalog that cannot be built: the message names the file and, where there is one, the
    row (1-based data row, header excluded: CSV line = row + 1) and the column."""
