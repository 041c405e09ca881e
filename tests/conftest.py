import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def paft_cache(tmp_path_factory):
    """Keep test models out of the user's cache; child processes inherit the variable."""
    root = tmp_path_factory.mktemp("paft-cache")
    old = os.environ.get("PAFT_CACHE")
    os.environ["PAFT_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("PAFT_CACHE", None)
    else:
        os.environ["PAFT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(paft_cache):
    from paft.models import resolve_model_dir

    return resolve_model_dir("tiny")


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir):
    from paft.models import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture()
def tiny_model(tiny_dir):
    from paft.models import load_model

    return load_model(tiny_dir)
