"""Fixtures shared by several test files (the repository root's conftest.py has one_thread). pool is module-scoped:
each test file that uses it (test_train*.py, test_data.py, test_color_device.py) builds its own."""
import pytest

import ss_proposals
import synthetic


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A tiny unlabelled pool (8 synthetic images) with its selective-search proposals."""
    root = synthetic.ensure_synthetic_dataset(tmp_path_factory.mktemp("synth") / "d", n_unlabelled=8, n_train=1,
                                              n_val=1)
    proposals = root / "proposals.npz"
    ss_proposals.precompute(root / "unlabelled", proposals, workers=1, progress=False)
    return root / "unlabelled", proposals
