"""Fresh items: the small index next to the main one that takes new, changed and retired
items within seconds, durably (an fsync'd, crash-safe log), until the next rebuild.

- `fresh/log.py`: the append-only update log (framed, CRC-checked commit groups).
- `fresh/items.py`: updates and their validation.
- `fresh/store.py`: the in-memory state every serving process rebuilds from the log.
"""
