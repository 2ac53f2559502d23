"""A stand-in for a model's real preparation (a fine-tune, a conversion), in an empty cache."""
import pytest


@pytest.fixture
def stand_in_prepare(tmp_path, monkeypatch):
    """``stand_in_prepare(module, prepare_name, dir_name, model, tokenizer)`` makes the cache empty,
    outside the grader, and replaces ``module.<prepare_name>`` by a function that saves ``model``
    and ``tokenizer`` as the prepared model ``dir_name``; it returns the list of its calls."""
    from qcore.zoo import prepared

    monkeypatch.setenv("QCOURSE_CACHE", str(tmp_path))
    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)

    def install(module, prepare_name, dir_name, model, tokenizer):
        calls = []

        def stand_in():
            calls.append(1)
            with prepared.writing(dir_name, {"stand-in": True}) as out:
                model.save_pretrained(str(out))
                tokenizer.save_pretrained(str(out))

        monkeypatch.setattr(module, prepare_name, stand_in)
        return calls

    return install
