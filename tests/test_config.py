"""MixLoraConfig: published JSON round trip, validation messages, expert overrides (docs/algorithm.md §4)."""

import json
import math
import os

from dataclasses import fields

import pytest

from mixlora.config import CONFIG_NAME, LoraSettings, MixLoraConfig

# The example adapter_config.json of docs/algorithm.md §4, verbatim.
PUBLISHED_EXAMPLE = """
{"bias":"none","peft_type":"MIXLORA","r":16,"lora_alpha":32,"lora_dropout":0.05,
 "target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","down_proj","up_proj"],
 "routing_strategy":"mixlora","num_experts":8,"act_fn":"silu","top_k":2,
 "base_model_name_or_path":"meta-llama/Llama-2-7b-hf","task_type":"CAUSAL_LM"}
"""


def non_default_config() -> MixLoraConfig:
    """Every field set away from its default, so a round trip that drops or renames any field fails."""
    return MixLoraConfig(
        base_model_name_or_path="org/tiny-llama",
        task_type="QUESTION_ANS",
        r=4,
        lora_alpha=12.5,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        use_dora=True,
        use_rslora=True,
        lora_init="gaussian",
        expert_lora={"r": 2, "lora_alpha": 3, "lora_dropout": 0.1, "use_dora": False},
        num_experts=5,
        top_k=3,
        act_fn="gelu_pytorch_tanh",
        router_aux_loss_coef=0.02,
        router_z_loss_coef=0.001,
        router_init_range=0.5,
        jitter_noise=0.01,
        router_loss=False,
        top_p=0.6,
        temperature=0.7,
        expert_capacity=17,
        routing_strategy="mixlora-switch",
        ffn_dropout=0.2,
        sparse_step=3,
        loraplus_lr_ratio=16,
    )


def test_defaults():
    config = MixLoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (config.routing_strategy, config.num_experts, config.top_k) == ("mixlora", 8, 2)
    assert (config.router_aux_loss_coef, config.router_init_range, config.router_loss) == (0.01, 0.02, True)
    assert (config.router_z_loss_coef, config.jitter_noise) == (0.0, 0.0)
    assert (config.top_p, config.temperature, config.expert_capacity, config.ffn_dropout) == (0.8, 0.0, 32, 0.0)
    assert config.sparse_step is None and config.loraplus_lr_ratio is None
    assert config.act_fn is None and config.expert_lora is None


def test_dict_round_trip_through_json():
    config = non_default_config()
    data = json.loads(json.dumps(config.to_dict()))
    assert MixLoraConfig.from_dict(data) == config
    # Published names, one per field (expert_lora present because it is set).
    assert set(data) == {
        "base_model_name_or_path", "task_type", "peft_type", "bias", "r", "lora_alpha", "lora_dropout",
        "target_modules", "use_dora", "use_rslora", "lora_init", "expert_lora", "routing_strategy", "num_experts",
        "top_k", "act_fn", "router_aux_loss_coef", "router_z_loss_coef", "router_init_range", "jitter_noise",
        "router_loss", "top_p", "temperature", "expert_capacity", "ffn_dropout", "sparse_step", "loraplus_lr_ratio",
    }  # fmt: skip
    assert data["peft_type"] == "MIXLORA" and data["bias"] == "none"
    # to_dict is generated from the fields: every field has its key (none is forgotten when one is added).
    assert set(data) == {f.name for f in fields(MixLoraConfig)}


def test_to_dict_writes_the_types_the_published_loaders_assert():
    # MoE-PEFT asserts isinstance(lora_alpha, int) and isinstance(lora_dropout / coefficients, float), and reads
    # a present "expert_lora" key as a dict.
    data = MixLoraConfig(lora_alpha=32.0, lora_dropout=0, router_aux_loss_coef=1, jitter_noise=0).to_dict()
    assert type(data["lora_alpha"]) is int and data["lora_alpha"] == 32
    assert type(data["lora_dropout"]) is float
    assert type(data["router_aux_loss_coef"]) is float and type(data["jitter_noise"]) is float
    assert "expert_lora" not in data and "loraplus_lr_ratio" not in data  # omitted when None
    assert type(MixLoraConfig(lora_alpha=12.5).to_dict()["lora_alpha"]) is float
    data = MixLoraConfig(routing_strategy="mixlora-switch", router_init_range=1, router_z_loss_coef=0, top_p=1,
                         temperature=0, ffn_dropout=0, loraplus_lr_ratio=16, expert_lora={"lora_alpha": 8.0},
                         sparse_step=2).to_dict()
    for key in ("router_init_range", "router_z_loss_coef", "top_p", "temperature", "ffn_dropout",
                "loraplus_lr_ratio"):
        assert type(data[key]) is float, key
    assert type(data["expert_capacity"]) is int and type(data["sparse_step"]) is int
    assert type(data["expert_lora"]["lora_alpha"]) is int
    # MoE-PEFT's switch export writes sparse_step even when None, and reads it back as None.
    assert MixLoraConfig(routing_strategy="mixlora-switch").to_dict()["sparse_step"] is None


def test_save_and_load_pretrained(tmp_path):
    config = non_default_config()
    file = config.save_pretrained(tmp_path / "adapter")
    assert file == os.path.join(tmp_path / "adapter", CONFIG_NAME)
    with open(file) as f:
        assert json.load(f) == config.to_dict()
    assert MixLoraConfig.from_pretrained(tmp_path / "adapter") == config
    assert MixLoraConfig.from_pretrained(file) == config
    assert os.listdir(tmp_path / "adapter") == [CONFIG_NAME]


def test_from_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*{CONFIG_NAME}"):
        MixLoraConfig.from_pretrained(tmp_path)


def test_from_pretrained_names_the_file_of_an_invalid_config(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**MixLoraConfig().to_dict(), "top_k": 9}))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: MixLoraConfig.top_k must be in \[1, num_experts=8\], got 9"):
        MixLoraConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        MixLoraConfig.from_pretrained(tmp_path)


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    MixLoraConfig(r=4).save_pretrained(tmp_path)
    before = (tmp_path / CONFIG_NAME).read_bytes()

    def failing_replace(src, dst):
        assert os.path.exists(src)  # the new content was fully written under the temporary name
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        MixLoraConfig(r=16).save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).read_bytes() == before
    assert os.listdir(tmp_path) == [CONFIG_NAME]


def test_published_example_loads():
    config = MixLoraConfig.from_dict(json.loads(PUBLISHED_EXAMPLE))
    assert config.r == 16 and config.lora_alpha == 32 and config.lora_dropout == 0.05
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert config.routing_strategy == "mixlora" and config.num_experts == 8 and config.top_k == 2
    assert config.act_fn == "silu"
    assert config.base_model_name_or_path == "meta-llama/Llama-2-7b-hf" and config.task_type == "CAUSAL_LM"
    # Keys the example leaves out take the defaults.
    assert config.use_dora is False and config.use_rslora is False and config.expert_lora is None
    assert config.router_aux_loss_coef == 0.01 and config.router_init_range == 0.02 and config.router_loss is True
    assert config.attention_config() == LoraSettings(16, 32, 0.05, False, False, "original")
    assert config.expert_config().scaling == 2.0


def test_target_modules_as_dict():
    # The dict form of the published training configs: only names mapped to true are targeted, in order.
    data = {"target_modules": {"q_proj": True, "k_proj": False, "v_proj": True, "gate_proj": True, "up_proj": False}}
    assert MixLoraConfig.from_dict(data).target_modules == ["q_proj", "v_proj", "gate_proj"]
    assert MixLoraConfig(target_modules={"down_proj": True, "o_proj": False}).target_modules == ["down_proj"]
    with pytest.raises(ValueError, match=r"MixLoraConfig.target_modules given as a dict must map names to bools"):
        MixLoraConfig.from_dict({"target_modules": {"q_proj": 1}})


def test_expert_lora_overrides_and_scaling():
    config = MixLoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05,
        expert_lora={"r": 4, "lora_alpha": 6, "use_rslora": True, "lora_init": "gaussian"},
    )  # fmt: skip
    expert = config.expert_config()
    assert expert == LoraSettings(r=4, lora_alpha=6, lora_dropout=0.05, use_dora=False, use_rslora=True,
                                  lora_init="gaussian")  # fmt: skip
    assert math.isclose(expert.scaling, 6 / 2)  # rsLoRA: alpha / sqrt(r)
    attention = config.attention_config()
    assert attention == LoraSettings(8, 16, 0.05, False, False, "original")
    assert math.isclose(attention.scaling, 16 / 8)
    # rsLoRA at the top level applies to both groups unless the experts override it.
    both = MixLoraConfig(r=16, lora_alpha=8, use_rslora=True, expert_lora={"r": 4})
    assert math.isclose(both.attention_config().scaling, 8 / 4)
    assert math.isclose(both.expert_config().scaling, 8 / 2)
    off = MixLoraConfig(r=16, lora_alpha=8, use_rslora=True, expert_lora={"use_rslora": False})
    assert math.isclose(off.expert_config().scaling, 8 / 16)


def test_expert_lora_is_copied():
    overrides = {"r": 4}
    config = MixLoraConfig(expert_lora=overrides)
    overrides["r"] = 0
    assert config.expert_config().r == 4


def test_published_expert_lora_block_is_accepted():
    # The published code writes its expert block as a LoRA export: bias, task_type and base_model_name_or_path
    # come along with the real overrides.
    data = json.loads(PUBLISHED_EXAMPLE)
    data["expert_lora"] = {"bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "x",
                           "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "use_dora": True}  # fmt: skip
    config = MixLoraConfig.from_dict(data)
    assert config.expert_lora == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "use_dora": True}
    data["expert_lora"]["bias"] = "all"
    with pytest.raises(ValueError, match=r"MixLoraConfig.expert_lora\['bias'\] must be one of 'none', got 'all'"):
        MixLoraConfig.from_dict(data)


def test_legacy_mixtral_routing_strategy():
    data = json.loads(PUBLISHED_EXAMPLE)
    data["routing_strategy"] = "mixtral"
    data["target_modules"] = ["q_proj", "v_proj", "w1_proj", "w2_proj", "w3_proj"]
    config = MixLoraConfig.from_dict(data)
    assert config.routing_strategy == "mixlora"
    assert config.target_modules == ["q_proj", "v_proj", "gate_proj", "down_proj", "up_proj"]
    assert config.to_dict()["routing_strategy"] == "mixlora"
    # Only from_dict reads the legacy name; the constructor says so.
    with pytest.raises(ValueError, match="'mixtral' is the legacy name of 'mixlora'"):
        MixLoraConfig(routing_strategy="mixtral")


# MoE-PEFT's defaults for a key absent from adapter_config.json, per routing strategy.
STRATEGY_DEFAULTS = {
    "mixlora": {"router_z_loss_coef": 0.0, "router_init_range": 0.02, "jitter_noise": 0.0},
    "mixlora-dynamic": {"router_z_loss_coef": 0.0, "router_init_range": 0.02, "jitter_noise": 0.0},
    "mixlora-switch": {"router_z_loss_coef": 0.001, "router_init_range": 1.0, "jitter_noise": 0.01},
}


@pytest.mark.parametrize("strategy", sorted(STRATEGY_DEFAULTS))
def test_strategy_dependent_defaults(strategy):
    expected = STRATEGY_DEFAULTS[strategy]
    config = MixLoraConfig(routing_strategy=strategy)
    assert {key: getattr(config, key) for key in expected} == expected
    # What MoE-PEFT exports for this strategy (its export writes no router settings) reads with the same values.
    data = json.loads(PUBLISHED_EXAMPLE)
    data.pop("top_k")
    data["routing_strategy"] = strategy
    data.update({"mixlora": {"top_k": 2}, "mixlora-dynamic": {"top_p": 0.8, "temperature": 0.0},
                 "mixlora-switch": {"expert_capacity": 32, "sparse_step": None}}[strategy])
    loaded = MixLoraConfig.from_dict(data)
    assert {key: getattr(loaded, key) for key in expected} == expected
    assert (loaded.top_p, loaded.temperature, loaded.expert_capacity, loaded.ffn_dropout) == (0.8, 0.0, 32, 0.0)
    # to_dict writes the resolved values; a value given explicitly wins over the strategy's default.
    assert {key: loaded.to_dict()[key] for key in expected} == expected
    given = MixLoraConfig.from_dict({**data, "jitter_noise": 0.2, "router_init_range": 0.3, "router_z_loss_coef": 0})
    assert (given.jitter_noise, given.router_init_range, given.router_z_loss_coef) == (0.2, 0.3, 0)


def test_top_k_is_only_bounded_for_top_k_routing():
    # top_k (default 2) means nothing to the other strategies: a 1-expert top-p or switch adapter is valid.
    for strategy in ("mixlora-dynamic", "mixlora-switch"):
        assert MixLoraConfig(routing_strategy=strategy, num_experts=1).top_k == 2
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=1\], got 2"):
        MixLoraConfig(num_experts=1)


def test_unknown_routing_strategy_lists_known_ones():
    with pytest.raises(
        ValueError,
        match="MixLoraConfig.routing_strategy must be one of 'mixlora', 'mixlora-dynamic', 'mixlora-switch', "
        "got 'switch'",
    ):
        MixLoraConfig.from_dict({"routing_strategy": "switch"})


def test_unknown_keys_raise():
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'dtype', 'lr'; known keys: base_model_name_or_path"):
        MixLoraConfig.from_dict({**json.loads(PUBLISHED_EXAMPLE), "dtype": "bf16", "lr": 1e-4})
    with pytest.raises(ValueError, match="MixLoraConfig.from_dict expects a dict, got list"):
        MixLoraConfig.from_dict([("r", 8)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_model_name_or_path": 7}, r"base_model_name_or_path must be a str or None, got 7 \(int\)"),
        ({"task_type": "SEQ_CLS"}, "task_type must be one of 'CAUSAL_LM', 'QUESTION_ANS', got 'SEQ_CLS'"),
        ({"peft_type": "LORA"}, "peft_type must be one of 'MIXLORA', got 'LORA'"),
        ({"bias": "all"}, "bias must be one of 'none', got 'all'"),
        ({"bias": "lora_only"}, "bias must be one of 'none', got 'lora_only'"),
        ({"r": 0}, "r must be an int >= 1, got 0"),
        ({"r": -3}, "r must be an int >= 1, got -3"),
        ({"r": 8.0}, r"r must be an int, got 8.0 \(float\)"),
        ({"r": True}, r"r must be an int, got True \(bool\)"),
        ({"r": "8"}, r"r must be an int, got '8' \(str\)"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0, got 0"),
        ({"lora_alpha": -16}, "lora_alpha must be > 0, got -16"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be > 0, got inf"),
        ({"lora_alpha": "16"}, r"lora_alpha must be a number, got '16' \(str\)"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\), got -0.1"),
        ({"lora_dropout": float("nan")}, r"lora_dropout must be in \[0, 1\), got nan"),
        ({"target_modules": []}, "target_modules must be a non-empty list of module names, got \\[\\]"),
        ({"target_modules": "q_proj"}, "target_modules must be a non-empty list of module names, got 'q_proj'"),
        ({"target_modules": ["q_proj", 3]}, "target_modules must hold module names .*, got 3"),
        ({"target_modules": ["model.q_proj"]}, "target_modules must hold module names .*, got 'model.q_proj'"),
        ({"target_modules": ["q_proj", "q_proj"]}, "target_modules lists 'q_proj' more than once"),
        ({"use_dora": "yes"}, r"use_dora must be a bool, got 'yes' \(str\)"),
        ({"use_rslora": 1}, r"use_rslora must be a bool, got 1 \(int\)"),
        ({"lora_init": "kaiming"}, "lora_init must be one of 'original', 'gaussian', got 'kaiming'"),
        ({"expert_lora": {"rank": 4}}, "expert_lora has unknown key 'rank'; allowed keys: r, lora_alpha, "
                                       "lora_dropout, use_dora, use_rslora, lora_init"),  # fmt: skip
        ({"expert_lora": {"target_modules": ["q_proj"]}}, "expert_lora has unknown key 'target_modules'"),
        ({"expert_lora": {"r": 0}}, r"MixLoraConfig.expert_lora\['r'\] must be an int >= 1, got 0"),
        ({"expert_lora": {"lora_alpha": -1}}, r"MixLoraConfig.expert_lora\['lora_alpha'\] must be > 0, got -1"),
        ({"expert_lora": {"lora_dropout": 1}}, r"expert_lora\['lora_dropout'\] must be in \[0, 1\), got 1"),
        ({"expert_lora": {"use_dora": "no"}}, r"expert_lora\['use_dora'\] must be a bool, got 'no' \(str\)"),
        ({"expert_lora": {"lora_init": "zeros"}}, r"expert_lora\['lora_init'\] must be one of 'original', "),
        ({"expert_lora": [("r", 4)]}, r"expert_lora must be a dict or None, got \[\('r', 4\)\] \(list\)"),
        ({"routing_strategy": "topk"}, "routing_strategy must be one of 'mixlora', 'mixlora-dynamic', "),
        ({"num_experts": 0}, "num_experts must be an int >= 1, got 0"),
        ({"num_experts": 2.5}, r"num_experts must be an int, got 2.5 \(float\)"),
        ({"top_k": 0}, "top_k must be an int >= 1, got 0"),
        ({"top_k": 9}, r"MixLoraConfig.top_k must be in \[1, num_experts=8\], got 9"),
        ({"top_k": 3, "num_experts": 2}, r"MixLoraConfig.top_k must be in \[1, num_experts=2\], got 3"),
        ({"act_fn": "swiglu"}, "act_fn must be one of .*'silu'.*, got 'swiglu'"),
        ({"act_fn": 1}, r"act_fn must be a str or None, got 1 \(int\)"),
        ({"router_aux_loss_coef": -0.01}, "router_aux_loss_coef must be >= 0, got -0.01"),
        ({"router_z_loss_coef": -1}, "router_z_loss_coef must be >= 0, got -1"),
        ({"router_init_range": 0.0}, "router_init_range must be > 0, got 0.0"),
        ({"jitter_noise": 1.0}, r"jitter_noise must be in \[0, 1\), got 1.0"),
        ({"jitter_noise": -0.5}, r"jitter_noise must be in \[0, 1\), got -0.5"),
        ({"router_loss": "true"}, r"router_loss must be a bool, got 'true' \(str\)"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"temperature": -0.1}, "temperature must be >= 0, got -0.1"),
        ({"expert_capacity": 0}, "expert_capacity must be an int >= 1, got 0"),
        ({"expert_capacity": 2.0}, r"expert_capacity must be an int, got 2.0 \(float\)"),
        ({"ffn_dropout": 1.0}, r"ffn_dropout must be in \[0, 1\), got 1.0"),
        ({"ffn_dropout": -0.1}, r"ffn_dropout must be in \[0, 1\), got -0.1"),
        ({"sparse_step": 0}, "sparse_step must be an int >= 1, got 0"),
        ({"sparse_step": 1.5}, r"sparse_step must be an int, got 1.5 \(float\)"),
        ({"loraplus_lr_ratio": 0}, r"loraplus_lr_ratio must be > 0 \(or None\), got 0"),
        ({"loraplus_lr_ratio": -2.0}, r"loraplus_lr_ratio must be > 0 \(or None\), got -2.0"),
        ({"loraplus_lr_ratio": "16"}, r"loraplus_lr_ratio must be a number, got '16' \(str\)"),
        ({"routing_strategy": "mixlora-switch", "jitter_noise": 1.0}, r"jitter_noise must be in \[0, 1\), got 1.0"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixLoraConfig(**kwargs)
    # The same value read from JSON fails the same way.
    with pytest.raises(ValueError, match=message):
        MixLoraConfig.from_dict(kwargs)


def test_boundary_values_are_valid():
    # The edges of each allowed range: 0.0 dropout / jitter / coefficients, top_k == num_experts, E = 1.
    MixLoraConfig(lora_dropout=0.0, jitter_noise=0.0, router_aux_loss_coef=0.0, temperature=0.0, top_p=1.0)
    MixLoraConfig(num_experts=3, top_k=3)
    MixLoraConfig(num_experts=1, top_k=1, r=1, expert_capacity=1)
    MixLoraConfig(routing_strategy="mixlora-switch", ffn_dropout=0.0, sparse_step=1, loraplus_lr_ratio=1e-3)


def test_validate_catches_later_mutation(tmp_path):
    config = MixLoraConfig()
    config.top_k = 99
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=8\], got 99"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()
