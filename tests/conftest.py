import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny_recipe():
    return tiny_digits_recipe()


def tiny_digits_recipe() -> dict:
    """A digits recipe that trains in about a second."""
    return {
        "name": "tiny",
        "seed": 3,
        "data": {"source": "digits"},
        "teacher": {
            "model": {"hidden": [64], "dropout": 0.1},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "log_every": 5, "checkpoint_every": 7},
        },
        "student": {
            "model": {"hidden": [16]},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "log_every": 5, "checkpoint_every": 7},
        },
        "distill": {"temperature": 3.0, "alpha": 0.1},
        "eval": {"latency_runs": 5},
    }


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors, where threads only add synchronisation (slow on a loaded
    machine); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    """The tiny causal-LM tokenizer (``lm_fixtures.tiny_tokenizer``, 300 tokens)."""
    from lm_fixtures import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def teacher(tok):
    """A tiny random causal-LM teacher (two Llama layers) over ``tok``, in memory; a module may define its own."""
    from lm_fixtures import tiny_llama

    return tiny_llama(tok, layers=2)


@pytest.fixture(scope="module")
def bert_tok():
    """The tiny BERT tokenizer of ``text_fixtures`` (the topic words)."""
    from text_fixtures import tiny_bert_tokenizer

    return tiny_bert_tokenizer()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, bert_tok):
    """A tiny sentence-encoder teacher folder: four BERT layers, mean pooling, normalised."""
    from text_fixtures import save_sentence_encoder, tiny_bert

    return save_sentence_encoder(tmp_path_factory.mktemp("teacher"), tiny_bert(bert_tok, layers=4), bert_tok)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, bert_tok):
    """A tiny sentence-encoder student folder: two narrower BERT layers, not normalised."""
    from text_fixtures import save_sentence_encoder, tiny_bert

    folder = tmp_path_factory.mktemp("student")
    return save_sentence_encoder(folder, tiny_bert(bert_tok, layers=2, hidden=16, seed=1), bert_tok, normalize=False)


@pytest.fixture(autouse=True)
def _outputs_on_accelerator(request):
    """Tests marked ``on_accelerator`` (or every test, with DISTILL_SIMULATE_ACCELERATOR=1) run with each model
    output behaving as an accelerator's tensor: a ``.numpy()`` on it fails as it would on a GPU."""
    if request.node.get_closest_marker("on_accelerator") or os.environ.get("DISTILL_SIMULATE_ACCELERATOR") == "1":
        from accelerator_sim import outputs_on_accelerator

        with outputs_on_accelerator():
            yield
    else:
        yield
