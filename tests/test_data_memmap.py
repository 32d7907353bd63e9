"""Token files: a real .npy is parsed (same windows as the headerless file) or refused, never read
as tokens; a bogus memmap_dtype is one line."""
import numpy as np
import pytest

from dsel.cli import main
from dsel.data.memmap import MemmapTokens
from dsel.errors import DselError
from dsel.score.commands import open_windows


def test_npy_with_header_reads_like_the_headerless_file(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 60000, 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", tokens)
    raw, npy = (open_windows(str(tmp_path / name), 16, "uint32" if name.endswith("npy") else "uint16")
                for name in ("t.bin", "t.npy"))
    assert npy.source.header_bytes > 0 and npy.dtype == np.uint16 and len(npy) == len(raw) == 1000 // 16
    np.testing.assert_array_equal(npy.batch(np.arange(len(npy))), raw.batch(np.arange(len(raw))))
    np.testing.assert_array_equal(npy.tokens(0), tokens[:16])


@pytest.mark.parametrize("array,message", [
    (np.zeros((4, 4), np.uint16), r"a \.npy of uint16 \(4, 4\)"),
    (np.zeros(8, np.float32), r"a \.npy of float32"),
    (np.zeros(8, ">u2"), r"a \.npy of >u2"),
])
def test_npy_that_is_not_tokens_is_refused(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(DselError, match=message):
        MemmapTokens(tmp_path / "x.npy")


def test_bogus_memmap_dtype_is_one_line(tmp_path, capsys):
    np.zeros(64, np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(SystemExit) as info:
        main(["score", f"corpus={tmp_path / 't.bin'}", "window=8", "scorer=pds", "memmap_dtype=bogus"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "dsel score: error: memmap_dtype='bogus': not a NumPy dtype; " \
                                           "headerless token files are uint16 or uint32"
