"""Pushing stages to the Hub, tested against a local HTTP server on 127.0.0.1.

The test machines have no network, so :class:`recipe_utils.FakeHub` (a small ``http.server`` answering whoami,
create repo, create branch, preupload and commit, and recording every request) stands in for the Hugging Face Hub;
``hub.endpoint`` points huggingface_hub's ``HfApi`` at it and the upload code runs unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest
from recipe_utils import FakeHub, all_text_under, one_thread, read_json, tiny_recipe

from gere_hf.continual import RecipeError, parse_recipe, run_recipe
from gere_hf.continual.hub import HubConfig, HubError, HubTarget, hub_preflight, model_card, push_stage, stage_files


@pytest.fixture
def no_saved_token(tmp_path, monkeypatch):
    """No token anywhere: not in the environment, not in a saved login."""
    import huggingface_hub.constants as constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GERE_TEST_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections to it are refused


def _nothing_written(out) -> bool:
    return not os.path.exists(os.path.join(out, "run_state.json")) and not os.path.exists(os.path.join(out, "stages"))


def test_push_every_stage_as_its_own_repo(tmp_path, monkeypatch, no_saved_token, caplog, capfd):
    """A 2-stage LoRA run pushes each finished stage (adapter, tokenizer, metrics, model card) to its own repo."""
    out = tmp_path / "hubrun"
    with FakeHub() as hub:
        monkeypatch.setenv("GERE_TEST_TOKEN", hub.token)
        recipe = tiny_recipe(out, "name=hubrun", "evaluation.general_texts=2", "training.max_steps=1",
                             "training.save_strategy=steps", "training.save_steps=1", "keep_checkpoints=true",
                             f"hub={{push: true, endpoint: '{hub.url}', token_env: GERE_TEST_TOKEN}}")
        caplog.set_level(logging.DEBUG)
        with one_thread():
            run_recipe(recipe)
    assert not hub.unhandled, hub.unhandled
    assert sorted(hub.repos) == ["tester/hubrun-polarity", "tester/hubrun-trivia"]
    for index, name in enumerate(["polarity", "trivia"], start=1):
        repo = hub.repos[f"tester/hubrun-{name}"]
        assert repo["private"] is True
        files = repo["branches"]["main"]
        assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "metrics.json",
                "trainer_state.json", "tokenizer_config.json"} <= set(files)
        assert not any(p.startswith("checkpoints/") for p in files)  # kept locally, never pushed
        local = os.path.join(out, "stages", f"{index}-{name}")
        assert os.path.isdir(os.path.join(local, "checkpoints"))
        with open(os.path.join(local, "adapter_model.safetensors"), "rb") as f:
            assert files["adapter_model.safetensors"] == f.read()
        card = files["README.md"].decode()
        assert "library_name: peft" in card and f"stage {index}/2" in card and f"`{name}`" in card
        assert "| loss | tm |" in card and "Accuracy after this stage" in card
        assert "base_model:" not in card  # a random local model has no Hub id
        assert json.loads(files["metrics.json"])["stage"] == index
    state = read_json(out / "run_state.json")
    assert [s["hub"]["repo_id"] for s in state["stages"]] == ["tester/hubrun-polarity", "tester/hubrun-trivia"]
    assert [c["summary"] for c in hub.commits] == ["GeRe stage 1: polarity", "GeRe stage 2: trivia"]
    # The token was sent to the Hub, and is nowhere else: files of the run, logs, printed output.
    assert hub.token not in all_text_under(str(out))
    captured = capfd.readouterr()
    assert hub.token not in captured.out + captured.err
    assert hub.token not in caplog.text
    assert hub.token not in json.dumps(state)


def test_push_stages_as_branches_of_one_repo(tmp_path, no_saved_token):
    stage_dir = tmp_path / "stages" / "1-polarity"
    (stage_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (stage_dir / "checkpoints" / "checkpoint-1" / "optimizer.pt").write_bytes(b"x" * 10)
    (stage_dir / "adapter_model.safetensors").write_bytes(b"weights")
    (stage_dir / "README.md").write_text("---\nlibrary_name: peft\n---\n# card\n")
    (stage_dir / "training_args.bin").write_bytes(b"a pickle")
    assert [p for p, _ in stage_files(str(stage_dir))] == ["README.md", "adapter_model.safetensors"]
    with FakeHub() as hub:
        config = HubConfig(push=True, layout="revisions", endpoint=hub.url, token_env="GERE_TEST_TOKEN")
        os.environ["GERE_TEST_TOKEN"] = hub.token
        try:
            target = hub_preflight(config, "myrun", ["polarity", "trivia"])
            pushed = [push_stage(target, str(stage_dir), i, name) for i, name in ((1, "polarity"), (2, "trivia"))]
        finally:
            del os.environ["GERE_TEST_TOKEN"]
    assert list(hub.repos) == ["tester/myrun"]
    branches = hub.repos["tester/myrun"]["branches"]
    assert set(branches) == {"main", "stage-1-polarity", "stage-2-trivia"}
    assert branches["stage-1-polarity"]["adapter_model.safetensors"] == b"weights"
    assert branches["main"] == {}
    assert [(p["repo_id"], p["revision"]) for p in pushed] == [("tester/myrun", "stage-1-polarity"),
                                                                ("tester/myrun", "stage-2-trivia")]
    assert not hub.unhandled


def test_push_without_token_fails_before_training(tmp_path, no_saved_token):
    out = tmp_path / "run"
    recipe = tiny_recipe(out, "hub.push=true", "hub.endpoint=http://127.0.0.1:9")
    with pytest.raises(HubError, match=r"no Hugging Face token.*HF_TOKEN.*hf auth login.*Nothing was trained"):
        run_recipe(recipe)
    assert _nothing_written(out)


def test_push_without_network_fails_before_training(tmp_path, monkeypatch, no_saved_token):
    out = tmp_path / "run"
    secret = "hf_unreachable_secret_456"
    monkeypatch.setenv("HF_TOKEN", secret)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(HubError) as err:
        run_recipe(tiny_recipe(out, "hub.push=true", f"hub.endpoint={endpoint}"))
    message = str(err.value)
    assert endpoint in message and "cannot be used" in message and "Nothing was trained" in message
    assert secret not in message
    assert _nothing_written(out)


def test_push_with_a_rejected_token_fails_before_training(tmp_path, monkeypatch, no_saved_token):
    out = tmp_path / "run"
    with FakeHub(token="hf_the_right_one") as hub:
        monkeypatch.setenv("HF_TOKEN", "hf_a_wrong_secret_789")
        with pytest.raises(HubError) as err:
            run_recipe(tiny_recipe(out, "hub.push=true", f"hub.endpoint={hub.url}"))
    assert "401" in str(err.value) or "Invalid" in str(err.value)
    assert "hf_a_wrong_secret_789" not in str(err.value)
    assert _nothing_written(out)


def test_invalid_repository_names_fail_before_training(tmp_path, monkeypatch, no_saved_token):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_TOKEN", hub.token)
        config = HubConfig(push=True, endpoint=hub.url, repo_id="{user}/{run}--{stage}")
        with pytest.raises(HubError, match="invalid repository id 'tester/run--a'"):
            hub_preflight(config, "run", ["a"])


def test_hub_config_errors():
    with pytest.raises(RecipeError, match="layout"):
        parse_recipe(tiny_recipe("/tmp/x", "hub.layout=branches"))
    with pytest.raises(RecipeError, match=r"unknown placeholder\(s\) \['stag'\]"):
        parse_recipe(tiny_recipe("/tmp/x", "hub.repo_id={user}/{stag}"))
    with pytest.raises(RecipeError, match="needs its own repository"):
        parse_recipe(tiny_recipe("/tmp/x", "hub.repo_id={user}/{run}"))
    with pytest.raises(RecipeError, match="Unknown key 'token' in hub"):  # a token never goes into a recipe
        parse_recipe(tiny_recipe("/tmp/x", "hub.token=hf_x"))


def test_model_card_names_base_model_stage_task_settings_and_metrics():
    card = model_card(
        run="demo", base_model="smollm2-135m", base_model_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", index=2,
        num_stages=3, stage="polarity", task={"name": "polarity", "num_train": 150, "num_eval": 50,
                                               "scoring": "loglik", "meta": {"source": "Pang & Lee"}},
        stages=["wiki_topic", "polarity", "trivia"], gere={"loss": "tm", "weight": "dy", "replay_num_samples": 1000},
        method="LoRA (stack)", metrics={"train": {"train_loss": 1.25}, "accuracy": {"wiki_topic": 0.8, "polarity": 0.9},
                                        "general": {"nll": 2.5, "ppl": 12.18}},
    )
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft\n")
    assert "stage 2/3, `polarity`" in card and "wiki_topic → **polarity** → trivia" in card
    assert "| replay_num_samples | 1000 |" in card and "| polarity | 0.9 |" in card and "NLL 2.5" in card
    assert "apply the adapters of stages 1..2 in order" in card
    # As TRL's cards: the method, a link to its paper, the BibTeX; the Hub tags.
    assert "This model was trained with GeRe, a method introduced in [GeRe: Towards Efficient Anti-Forgetting" in card
    assert "(https://huggingface.co/papers/2508.04676)" in card and "@misc{zhang2025gereantiforget," in card
    assert "tags:\n- gere\n- continual-learning\n- general-sample-replay\n- trl\n- sft\n- lora\n---" in card
    baseline = model_card(
        run="demo", base_model="x", base_model_hub_id=None, index=1, num_stages=1, stage="polarity",
        task={"name": "polarity"}, stages=["polarity"], gere={"loss": "none"}, method="full fine-tuning",
        metrics={}, tracking={"wandb_run_id": "demo-1-polarity-ab12", "tensorboard_dir": "/runs/tb/1-polarity"},
    )
    assert "without replay" in baseline and "2508.04676" not in baseline and "- gere" not in baseline
    assert "W&B run id `demo-1-polarity-ab12`, TensorBoard logs in `/runs/tb/1-polarity`." in baseline
    assert isinstance(HubTarget, type)
