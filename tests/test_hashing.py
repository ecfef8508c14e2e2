"""The content hash keys the merged-tensor cache and the probe's reference rows: equal content, equal key."""

import torch

from merging.hashing import content_hash


def test_tensors_of_every_dtype_hash_by_value_shape_and_dtype():
    """bfloat16 (which numpy cannot hold) hashes like the others: the same values give the same key, another
    value, shape or dtype another key — so a bf16 extra keys the cache instead of failing the merge."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        x = torch.arange(6, dtype=dtype)
        assert content_hash(x) == content_hash(x.clone())
        changed = x.clone()
        changed[3] = 9
        assert content_hash(changed) != content_hash(x)
        assert content_hash(x.reshape(2, 3)) != content_hash(x)
    assert content_hash(torch.ones(3, dtype=torch.bfloat16)) != content_hash(torch.ones(3, dtype=torch.float16))
