"""Session fixtures shared by every test folder."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """A tiny synthetic COCO set: 8 train and 4 val images of 64-96 px."""
    from datasets.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_coco")
    generate(root, num_train=8, num_val=4, seed=3, min_size=64, max_size=96, max_objects=3)
    return root


@pytest.fixture(autouse=True)
def _reset_run_logging():
    """setup_logging points the package logger at a run's console and log.txt and stops it
    propagating; undo that after each test, so the next one's caplog sees its records."""
    import logging

    yield
    logger = logging.getLogger("detr_sparse")
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
