import pytest

from workers.embedded import ModelNotFoundError, embedded_path, fetch_embedded, resolve_model


def test_missing_embedded_model_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="ferry fetch-model smollm2"):
        resolve_model("smollm2")


def test_unknown_path_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="Hugging Face model folder"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no embedded model named 'llama9'"):
        fetch_embedded("llama9")


def test_resolves_existing_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("FERRY_HOME", str(tmp_path))
    target = embedded_path("smollm2")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert resolve_model("smollm2") == target
    assert resolve_model(str(tmp_path)) == tmp_path
