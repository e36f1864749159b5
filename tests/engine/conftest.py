import pytest

from tests.utils import make_engine, make_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random-init small/large pair sharing the demo tokenizer."""
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def engine(pair):
    return make_engine(*pair)
