"""TrainConfig and the CLI: YAML, overrides, and clear errors before any model is loaded."""
import pytest
import yaml

from entropy_ops.trainers import grpo_trainer
from entropy_ops.trainers.cli import main, split_overrides
from entropy_ops.trainers.config import TrainConfig



def test_defaults_validate():
    config = TrainConfig().validate()
    assert config.algo == "grpo" and config.model == "tiny-arith" and config.group_size == 8


def test_every_field_is_documented():
    helps = TrainConfig.fields_help()
    assert set(helps) == set(TrainConfig().to_dict())
    assert all(len(h) > 10 for h in helps.values())


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo: dr_grpo\nlearning_rate: 1e-4\nloss:\n  eps_high: 0.28\nrewards:\n  correctness: 1\n")
    config = TrainConfig.from_yaml(path)
    assert config.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as a string: converted
    assert config.rewards == {"correctness": 1.0} and isinstance(config.rewards["correctness"], float)
    config.apply_overrides(["max-steps=7", "loss.beta=0.01", "rewards.format=0.5", "output_dir=x", "top_p=0.9"])
    assert (config.max_steps, config.output_dir, config.top_p) == (7, "x", 0.9)
    assert config.loss == {"eps_high": 0.28, "beta": 0.01}
    assert config.rewards == {"correctness": 1.0, "format": 0.5}
    config.validate()


@pytest.mark.parametrize("values, exc, match", [
    ({"learning_rat": 1e-3}, ValueError, "unknown config key 'learning_rat'; did you mean 'learning_rate'"),
    ({"max_steps": "ten"}, TypeError, "max_steps must be an integer"),
    ({"max_steps": 2.5}, TypeError, "max_steps must be an integer"),
    ({"learning_rate": True}, TypeError, "learning_rate must be a number"),
    ({"learning_rate": "fast"}, TypeError, "learning_rate must be a number"),
    ({"dynamic_sampling": "yes"}, TypeError, "dynamic_sampling must be true or false"),
    ({"rewards": ["correctness"]}, TypeError, "rewards must be a mapping"),
    ({"model": 3}, TypeError, "model must be a string"),
    ({"max_steps.x": 1}, ValueError, "not a mapping"),
])
def test_bad_keys_and_types(values, exc, match):
    with pytest.raises(exc, match=match):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize("values, match", [
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"learning_rate": -1e-3}, "learning_rate must be a finite number > 0"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"adam_beta2": 1.0}, "adam_beta2"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of"),
    ({"device": "tpu"}, "device"),
    ({"model": "/nonexistent/model-dir"}, "model path '/nonexistent/model-dir' does not exist"),
    ({"model": "./missing"}, "does not exist"),
    ({"ref_model": "/nonexistent/ref"}, "ref_model"),
    ({"dataset": "/nonexistent/data.jsonl"}, "dataset must be .* or an existing JSONL file"),
    ({"algo": "ppo"}, "algo: unknown algorithm 'ppo'"),
    ({"algo_options": {"alpha": 1}}, "algo_options: unknown key"),
    ({"rewards": {"corectness": 1.0}}, "unknown reward 'corectness'"),
    ({"rewards": {}}, "rewards must name at least one"),
    ({"loss": {"eps_hi": 0.3}}, "loss: unknown key"),
    ({"loss": {"temperature": 0.7}}, "set `temperature` instead"),
    ({"answer_format": "xml"}, "answer_format must be one of"),
])
def test_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values).validate()


def test_model_dir_without_config(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        TrainConfig(model=str(tmp_path)).validate()


def test_offline_hub_name_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        TrainConfig(model="no-such-org/no-such-model").validate()


@pytest.mark.parametrize("values", [
    {"group_size": 1}, {"learning_rate": -1.0}, {"model": "/nonexistent/model"}, {"resume": True},
])
def test_trainer_rejects_before_loading(values, no_model_loading):
    with pytest.raises(ValueError):
        grpo_trainer.Trainer(TrainConfig.from_dict(values))


def test_split_overrides():
    assert split_overrides(["--a=1", "--b", "2", "--c.d=x"]) == ["a=1", "b=2", "c.d=x"]
    with pytest.raises(ValueError, match="has no value"):
        split_overrides(["--flag"])
    with pytest.raises(ValueError, match="unexpected argument"):
        split_overrides(["stray"])


def test_cli_print_config(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("group_size: 4\n")
    assert main(["train", "--config", str(path), "--max-steps", "5", "--loss.eps_high=0.28",
                 "--algo", "rloo", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "# Completions sampled per prompt (G >= 2)." in out
    values = yaml.safe_load(out)
    assert (values["group_size"], values["max_steps"], values["algo"]) == (4, 5, "rloo")
    assert values["loss"] == {"eps_high": 0.28}
    assert TrainConfig.from_dict(values).validate() is not None  # the printed config loads back


@pytest.mark.parametrize("argv, match", [
    (["train", "--bogus=1"], "unknown config key 'bogus'"),
    (["train", "--group-size=1"], "group_size must be >= 2"),
    (["train", "--learning_rate=-0.1"], "learning_rate must be a finite number > 0"),
    (["train", "--model", "/nonexistent/model"], "does not exist"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
])
def test_cli_errors_are_messages(argv, match, capsys, no_model_loading):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err
