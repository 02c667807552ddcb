"""Shared test setup: the `device` parametrisation, the `cuda` marker's skip, fixtures over the one tiny-model
builder (tests/tiny_models.py) and the `scripted` sampler of CLI runs. The markers themselves are registered once,
in pyproject.toml."""
import pytest
import torch

import tiny_models

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    # `@pytest.mark.cuda` alone makes a test skip on a machine without a GPU (a `device` param included).
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Each test that takes it runs once per device: "cpu", and "cuda" (skipped without a GPU)."""
    return request.param


@pytest.fixture
def scripted(monkeypatch):
    """Runs and stage commands sample with test_loop's scripted sampler (a random model never writes the markers)."""
    import tpo_lite.loop as loop
    from test_loop import scripted_factory

    monkeypatch.setattr(loop, "run_sampler", scripted_factory())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The path (str) of a saved tiny Llama + word-level tokenizer (tiny_models.make_tiny_model: seed 0, tied
    head, vocab VOCAB); one per test module, so no module sees what another wrote next to it."""
    return str(tiny_models.make_tiny_model(tmp_path_factory.mktemp("tiny")))
