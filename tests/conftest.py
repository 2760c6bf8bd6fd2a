from collections.abc import Iterator

import pytest
import torch

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP barriers make each
    forward ~100x slower (1 s instead of 10 ms measured under load). Opt in per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; real-model tests keep torch's default threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
