"""Model archives whose large tensors are memory-mapped files shared by every model.

A model version folder holds `model.pt` (TorchScript: the graph, the weights and every small
tensor) and, for each tensor of at least `MIN_BYTES`, a `.npy` file named after the tensor's
attribute path; `tensors.json` says which attribute reads which file. The builder saves all
models of one build through one `TensorFiles`, which writes a tensor the first time it meets it
and hard-links that file for every later attribute or model holding the same tensor: the
`unified` model, the `ann` stage and the `scorer` all list the index's int8 codes, and all
three folders hold links to one file (one inode, one copy on disk).

`load` maps the files copy-on-write (numpy `mmap_mode="c"`: the file is opened read-only,
pages are read from the page cache on first touch and shared by every process that maps the
same file; a write, which no served module makes, would stay private to its process). So a
server running `unified` and the `retrieval` ensemble's stages holds one copy of each catalog
tensor in memory instead of one per model process, and a model starts without reading its
whole archive: pages come in as queries touch them.

Why not TorchScript's own format for everything: torch.jit.load reads every tensor of the
archive into the process's private memory, so each Python-backend stub held its own copy
(docs/scaling.md, "Memory per item").
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
import torch

ARTIFACT = "model.pt"
MANIFEST = "tensors.json"
MIN_BYTES = 64 * 1024  # smaller tensors stay inside model.pt

TensorKey = Tuple[int, int, Tuple[int, ...], Tuple[int, ...], torch.dtype]


def _key(t: torch.Tensor) -> TensorKey:
    """The identity of a tensor's data: same storage, offset, shape, strides and type."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def _owner(module: torch.jit.ScriptModule, path: str
           ) -> Tuple[torch.jit.ScriptModule, str]:
    """(the submodule holding attribute `path`, its last name)."""
    *parents, leaf = path.split(".")
    for name in parents:
        module = getattr(module, name)
    return module, leaf


class TensorFiles:
    """Writes the large tensors of one build's models once, and links them everywhere else.

    `min_bytes`: tensors smaller than this stay inside model.pt."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes
        self.written: Dict[TensorKey, Path] = {}

    def save(self, module: torch.nn.Module, version_dir: Path) -> torch.jit.ScriptModule:
        """Scripts `module` and writes it into `version_dir` (model.pt, tensors.json and the
        tensor files); returns the scripted module, its tensors in place."""
        version_dir = Path(version_dir)
        scripted = module if isinstance(module, torch.jit.ScriptModule) \
            else torch.jit.script(module.eval())
        manifest: Dict[str, str] = {}
        taken: List[Tuple[str, torch.Tensor]] = []
        tensors = itertools.chain(scripted.named_parameters(remove_duplicate=False),
                                  scripted.named_buffers(remove_duplicate=False))
        for path, tensor in tensors:  # weights too: a user tower's id embedding table
            if tensor.numel() * tensor.element_size() < self.min_bytes:
                continue
            name = f"{path}.npy"
            self._write(tensor, version_dir / name)
            manifest[path] = name
            taken.append((path, tensor))
        try:
            for path, tensor in taken:  # an empty placeholder of the same type in model.pt
                owner, leaf = _owner(scripted, path)
                setattr(owner, leaf, torch.empty(0, dtype=tensor.dtype))
            scripted.save(str(version_dir / ARTIFACT))
        finally:
            for path, tensor in taken:
                owner, leaf = _owner(scripted, path)
                setattr(owner, leaf, tensor)
        (version_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        return scripted

    def _write(self, tensor: torch.Tensor, target: Path) -> None:
        key = _key(tensor)
        first = self.written.get(key)
        target.unlink(missing_ok=True)
        if first is not None:
            try:
                os.link(first, target)  # one inode: one copy on disk and in the page cache
                return
            except OSError:  # another file system: a copy (correct, not shared)
                shutil.copyfile(first, target)
                return
        with open(target, "wb") as fh:
            np.save(fh, tensor.detach().cpu().contiguous().numpy(), allow_pickle=False)
        self.written[key] = target


def _touch_every_page(array: np.ndarray, page: int = 4096) -> None:
    """Reads one byte of every page, so that the mapping is resident when the model reports
    ready (from the page cache when another process mapped the file first): no query pays
    for page faults from disk, and memory figures show the steady state."""
    flat = array.reshape(-1).view(np.uint8)
    int(flat[::page].sum(dtype=np.int64))


def load(version_dir: Path, device: Union[str, torch.device] = "cpu",
         prefault: bool = True) -> torch.jit.ScriptModule:
    """The model of `version_dir`: model.pt with its tensor files mapped in (see the module
    docstring), every page touched once unless `prefault` is False. A folder without
    tensors.json (an archive holding every tensor) loads as it is. On a GPU the mapped
    tensors are copied to the device."""
    version_dir = Path(version_dir)
    device = torch.device(device)
    module = torch.jit.load(str(version_dir / ARTIFACT), map_location=device)
    manifest_path = version_dir / MANIFEST
    if not manifest_path.exists():
        return module
    manifest = json.loads(manifest_path.read_text())
    mapped: Dict[Tuple[int, int], torch.Tensor] = {}  # (device, inode) -> tensor
    for path, name in sorted(manifest.items()):
        file = version_dir / name
        if not file.is_file() or Path(name).name != name:
            raise FileNotFoundError(f"{manifest_path}: {path} reads {file}, which is missing")
        stat = file.stat()
        tensor = mapped.get((stat.st_dev, stat.st_ino))
        if tensor is None:
            try:
                array = np.load(file, mmap_mode="c", allow_pickle=False)
            except ValueError as e:  # a truncated or foreign file
                raise ValueError(f"{file}: {e}") from e
            if prefault:
                _touch_every_page(array)
            tensor = torch.from_numpy(array)
            if device.type != "cpu":
                tensor = tensor.to(device)
            mapped[(stat.st_dev, stat.st_ino)] = tensor
        owner, leaf = _owner(module, path)
        setattr(owner, leaf, tensor)
    return module
