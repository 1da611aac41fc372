"""Model archives with shared, memory-mapped tensor files (stages/archive.py) and the item
vectors the scorer and the history pooling share with the index (stages/item_vectors.py)."""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ann.ivf import quantize_int8
from stages import archive
from stages.item_vectors import Fp32Vectors, Int8ResidualVectors, Int8Vectors
from stages.rows import fresh_row_offset


class Table(nn.Module):
    def __init__(self, big: torch.Tensor, small: torch.Tensor):
        super().__init__()
        self.register_buffer("big", big)
        self.register_buffer("small", small)
        self.embedding = nn.Embedding(5000, 8)  # a large weight: a file too
        self.requires_grad_(False)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.big[rows].sum(-1) + self.small.sum() + self.embedding(rows).sum(-1)


class Two(nn.Module):
    """Two submodules holding the same tensor, as `unified` holds the index's codes twice."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.a(rows) + 2 * self.b(rows)


def _inode(path: Path) -> int:
    return os.stat(path).st_ino


def _mapped_inodes() -> set:
    """Inodes of the files this process maps (/proc/self/maps, 5th column)."""
    with open("/proc/self/maps") as fh:
        return {int(line.split()[4]) for line in fh if len(line.split()) >= 6}


def test_saved_models_share_one_file_per_tensor_and_load_to_the_same_answers(tmp_path):
    big = torch.randn(5000, 16)  # 320 KB: a file; small stays in model.pt
    small = torch.arange(10.0)
    table = Table(big, small)
    both = Two(table, Table(big, small))
    files = archive.TensorFiles()
    for name, module in (("one", table), ("both", both)):
        (tmp_path / name).mkdir()
        files.save(module, tmp_path / name)
    rows = torch.tensor([[0, 4999], [17, 17]])
    assert sorted(p.name for p in (tmp_path / "both").glob("*.npy")) == [
        "a.big.npy", "a.embedding.weight.npy", "b.big.npy", "b.embedding.weight.npy"]
    # one inode for every attribute holding the tensor, across models
    inode = _inode(tmp_path / "one" / "big.npy")
    assert _inode(tmp_path / "both" / "a.big.npy") == inode
    assert _inode(tmp_path / "both" / "b.big.npy") == inode
    assert os.stat(tmp_path / "one" / "big.npy").st_nlink == 3
    # model.pt holds placeholders only: far smaller than the tensor
    assert (tmp_path / "one" / "model.pt").stat().st_size < big.numel() * 4 / 4
    for name, module in (("one", table), ("both", both)):
        loaded = archive.load(tmp_path / name)
        torch.testing.assert_close(loaded(rows), module(rows), rtol=0, atol=0)
    loaded = archive.load(tmp_path / "both")
    # mapped, not read: the file's inode is in this process's maps, once for both attributes
    assert inode in _mapped_inodes()
    assert loaded.a.big.data_ptr() == loaded.b.big.data_ptr()
    assert torch.equal(loaded.a.small, small)


def test_a_model_without_a_manifest_loads_as_an_ordinary_archive(tmp_path):
    table = Table(torch.randn(5000, 16), torch.arange(3.0))
    torch.jit.script(table).save(str(tmp_path / "model.pt"))
    rows = torch.tensor([1, 2, 3])
    torch.testing.assert_close(archive.load(tmp_path)(rows), table(rows))


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_tensor_file_is_named(tmp_path, damage):
    archive.TensorFiles().save(Table(torch.randn(5000, 16), torch.arange(3.0)), tmp_path)
    path = tmp_path / "big.npy"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises((FileNotFoundError, ValueError), match="big.npy"):
        archive.load(tmp_path)


def _quantized(n=50, d=8, seed=0):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    codes, scales = quantize_int8(x)
    return x, codes, scales


def test_int8_vectors_dequantize_main_rows_and_read_fresh_rows_as_given():
    x, codes, scales = _quantized()
    table = torch.jit.script(Int8Vectors(codes, scales))
    n = x.shape[0]
    fresh = torch.randn(3, x.shape[1])
    offset = fresh_row_offset(n)
    rows = torch.tensor([[0, 49, -1], [offset + 2, 7, offset]])
    got = table.gather(rows, fresh)
    # the reference: the int8 reconstruction, elementwise, by hand
    want = torch.stack([codes[r].double() * float(scales[r]) for r in (0, 49, 0)]).float()
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1], torch.stack([fresh[2], codes[7].float() * scales[7],
                                                    fresh[0]]))
    # within half a quantization step of the fp32 vectors
    assert torch.all((table(torch.arange(n)) - x).abs() <= scales[:, None] / 2 + 1e-6)
    with pytest.raises(Exception, match="row out of range"):
        table.gather(torch.tensor([[n]]), None)
    with pytest.raises(Exception, match="row out of range"):
        table.gather(torch.tensor([[offset + 3]]), fresh)
    dense = torch.jit.script(Fp32Vectors(x))
    torch.testing.assert_close(dense.gather(rows, fresh)[1, 1], x[7])


def test_int8_residual_vectors_add_the_residual_code_and_cut_the_error():
    """Two-level int8: each row is scale * code + residual_scale * residual_code, by hand;
    within half a residual step of the fp32 vectors, at least 100x closer than the codes
    alone; fresh rows as given; archived and loaded, the same answers."""
    x, codes, scales = _quantized(n=300, d=16)
    rcodes, rscales = Int8ResidualVectors.residuals(x, codes, scales, chunk=64)
    table = torch.jit.script(Int8ResidualVectors(codes, scales, rcodes, rscales))
    want = torch.stack([codes[r].double() * float(scales[r]) + rcodes[r].double()
                        * float(rscales[r]) for r in range(300)]).float()
    torch.testing.assert_close(table(torch.arange(300)), want)
    assert torch.all((want - x).abs() <= rscales[:, None] / 2 + 1e-6)
    int8_error = (codes.float() * scales[:, None] - x).abs().max()
    assert float((want - x).abs().max()) * 100 < float(int8_error)
    fresh = torch.randn(2, 16)
    offset = fresh_row_offset(300)
    torch.testing.assert_close(table.gather(torch.tensor([[offset + 1, 5]]), fresh)[0],
                               torch.stack([fresh[1], want[5]]))
    with pytest.raises(ValueError, match="residual codes"):
        Int8ResidualVectors(codes, scales, rcodes[:-1], rscales[:-1])
    with pytest.raises(ValueError, match="int8 codes"):
        Int8ResidualVectors(x, scales, rcodes, rscales)


def test_int8_vectors_refuse_other_tensors():
    x, codes, scales = _quantized()
    with pytest.raises(ValueError, match="int8 codes"):
        Int8Vectors(x, scales)
    with pytest.raises(ValueError, match="int8 codes"):
        Int8Vectors(codes, scales[:-1])
