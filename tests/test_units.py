"""One byte-size parser behind `estimate.parse_bytes` (device memory) and `hf.files.size_bytes` (shard size)."""

import pytest

from zerojax import estimate
from zerojax._units import byte_count
from zerojax.hf import files

SIZES = {"80GB": 80 * 10**9, "80GiB": 80 * 2**30, "1.5 MiB": 3 * 2**19, "0.5kb": 500, " 7 B ": 7, "12": 12, 4096: 4096}
NOT_SIZES = ["-1GB", "0", 0, -3, True, "5K", "5KI", "GB", "1e9", "80 gigabytes", None]


@pytest.mark.parametrize("text,count", SIZES.items())
def test_both_parsers_read_a_size_alike(text, count):
    assert byte_count(text) == estimate.parse_bytes(text) == files.size_bytes(text) == count


@pytest.mark.parametrize("text", NOT_SIZES)
def test_both_parsers_refuse_with_their_own_message(text):
    assert byte_count(text) is None
    with pytest.raises(ValueError, match=r"--device-memory=.* is not a memory size; write e\.g\. 80GB"):
        estimate.parse_bytes(text, "--device-memory")
    with pytest.raises(ValueError, match=r"max_shard_size=.* is not a size; pass a positive number of bytes"):
        files.size_bytes(text)
