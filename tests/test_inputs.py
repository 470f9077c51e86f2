"""Bad input found by trying the tool as a newcomer: each gives one line naming the problem (a
UserError, exit 2 from the CLI), before anything slow or anything written."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from safedistill.errors import UserError
from safedistill.judges import load_judge
from safedistill.models import check_hub_name, load_model, pretrained_kwargs


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    ("load", "name", "fix"),
    [
        (load_model, "smollm2-135m", "smollm2-135m-instruct"),
        (load_model, "smolm2-135m-instruct", "smollm2-135m-instruct"),
        (load_judge, "keywords", "keyword"),
        (load_judge, "heuristik", "heuristic"),
    ],
)
def test_typo_offline_says_did_you_mean_at_once(offline, load, name, fix):
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        load(name)
    assert time.perf_counter() - start < 2
    text = one_line(e)
    assert text.endswith(f"did you mean {fix}?") and "offline" in text and name in text


def test_unknown_hub_id_offline_has_no_suggestion(offline):
    with pytest.raises(UserError) as e:
        check_hub_name("someorg/completely-different")
    assert "did you mean" not in one_line(e)


def test_unknown_model_type(tiny_llama_dir, tmp_path):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "lamma"}))
    with pytest.raises(UserError) as e:
        load_model(str(folder))
    assert f"{folder}/config.json: model_type 'lamma' is not known to transformers" in one_line(e)
    assert "did you mean llama?" in str(e.value)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: malformed JSON"):
        load_model(str(folder))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "adapter_config.json: malformed JSON"),
        ("[1, 2]", "adapter_config.json: not a peft adapter config"),
        ('{"peft_type": "LORA", "r": "sixteen", "target_modules": 5}', "could not apply the LoRA adapter"),
    ],
)
def test_malformed_adapter_config(tiny_llama_dir, tmp_path, text, message):
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(UserError) as e:
        load_model(str(tiny_llama_dir), adapter=str(tmp_path))
    assert message in one_line(e)


def test_safetensors_folders_load_with_use_safetensors(tiny_llama_dir, tmp_path):
    assert pretrained_kwargs(str(tiny_llama_dir)) == {"use_safetensors": True}
    assert pretrained_kwargs("someorg/somemodel") == {}
    # A pickle beside the safetensors weights is never unpickled.
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")
    model, _ = load_model(str(folder))
    assert model.config.model_type == "llama"
