"""Adapter checkpoints: our parameter names <-> published keys (docs/algorithm.md §4), and the files on disk."""

import datetime
import json
import os
import re

import pytest
import safetensors.torch
import torch

from mixlora.checkpoint import (
    CONFIG_NAME,
    SAFETENSORS_WEIGHTS_NAME,
    WEIGHTS_NAME,
    from_published_state_dict,
    read_adapter,
    write_adapter,
    to_published_state_dict,
)
from mixlora.config import MixLoraConfig

# A tiny 2-layer model: hidden H=12, attention LoRA rank 4 on q_proj (12 -> 12) and v_proj (12 -> 6, grouped KV),
# E=3 experts of rank R=5 on gate/up (12 -> 20) and down (20 -> 12). Every in/out size differs between
# projections, so a transposed or swapped tensor cannot pass a shape check by accident.
LAYERS, H, R_ATTN, E, R, I, KV = 2, 12, 4, 3, 5, 20, 6
HINT = "was this adapter trained for another base model or config?"


def published_shapes(dora: bool = False) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys and shapes the tiny model must produce, written from the §4 key list."""
    shapes = {}
    for i in range(LAYERS):
        shapes[f"mixlora.layers.{i}.self_attn.q_proj.lora_A.weight"] = (R_ATTN, H)
        shapes[f"mixlora.layers.{i}.self_attn.q_proj.lora_B.weight"] = (H, R_ATTN)
        shapes[f"mixlora.layers.{i}.self_attn.v_proj.lora_A.weight"] = (R_ATTN, H)
        shapes[f"mixlora.layers.{i}.self_attn.v_proj.lora_B.weight"] = (KV, R_ATTN)
        shapes[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = (E, H)
        for e in range(E):
            shapes[f"mixlora.layers.{i}.mlp.gate_proj.experts.{e}.lora_A.weight"] = (R, H)
            shapes[f"mixlora.layers.{i}.mlp.gate_proj.experts.{e}.lora_B.weight"] = (I, R)
            shapes[f"mixlora.layers.{i}.mlp.up_proj.experts.{e}.lora_A.weight"] = (R, H)
            shapes[f"mixlora.layers.{i}.mlp.up_proj.experts.{e}.lora_B.weight"] = (I, R)
            shapes[f"mixlora.layers.{i}.mlp.down_proj.experts.{e}.lora_A.weight"] = (R, I)
            shapes[f"mixlora.layers.{i}.mlp.down_proj.experts.{e}.lora_B.weight"] = (H, R)
        if dora:
            shapes[f"mixlora.layers.{i}.self_attn.q_proj.lora_magnitude_vector"] = (H,)
            shapes[f"mixlora.layers.{i}.self_attn.v_proj.lora_magnitude_vector"] = (KV,)
            for e in range(E):
                shapes[f"mixlora.layers.{i}.mlp.gate_proj.experts.{e}.lora_magnitude_vector"] = (I,)
                shapes[f"mixlora.layers.{i}.mlp.up_proj.experts.{e}.lora_magnitude_vector"] = (I,)
                shapes[f"mixlora.layers.{i}.mlp.down_proj.experts.{e}.lora_magnitude_vector"] = (H,)
    return shapes


def make_ours(prefix: str = "model.", dora: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """Our adapter parameters for the tiny model, fresh random values (router fp32, LoRA in `dtype`)."""

    def rand(*shape):
        return torch.randn(*shape, dtype=dtype)

    ours = {}
    for i in range(LAYERS):
        p = f"{prefix}layers.{i}."
        ours[p + "self_attn.q_proj.lora_A.weight"] = rand(R_ATTN, H)
        ours[p + "self_attn.q_proj.lora_B.weight"] = rand(H, R_ATTN)
        ours[p + "self_attn.v_proj.lora_A.weight"] = rand(R_ATTN, H)
        ours[p + "self_attn.v_proj.lora_B.weight"] = rand(KV, R_ATTN)
        ours[p + "mlp.moe_gate.weight"] = torch.randn(E, H, dtype=torch.float32)
        for proj, (n_in, n_out) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items():
            ours[p + f"mlp.experts.{proj}.lora_A"] = rand(E, R, n_in)
            ours[p + f"mlp.experts.{proj}.lora_B"] = rand(E, n_out, R)
            if dora:
                ours[p + f"mlp.experts.{proj}.lora_magnitude_vector"] = rand(E, n_out)
        if dora:
            ours[p + "self_attn.q_proj.lora_magnitude_vector"] = rand(H)
            ours[p + "self_attn.v_proj.lora_magnitude_vector"] = rand(KV)
    return ours


def to_legacy(published: dict, w_names: bool) -> dict:
    """The pre-Aug-2024 layout of the same weights: `layers.{i}.gate`, `layers.{i}.experts.{e}.{proj}`."""
    legacy_name = {"gate_proj": "w1_proj", "down_proj": "w2_proj", "up_proj": "w3_proj"} if w_names else {}
    legacy = {}
    for key, value in published.items():
        if m := re.fullmatch(r"mixlora\.layers\.(\d+)\.mlp\.moe_gate\.weight", key):
            key = f"mixlora.layers.{m[1]}.gate.weight"
        elif m := re.fullmatch(r"mixlora\.layers\.(\d+)\.mlp\.(\w+)\.experts\.(\d+)\.(lora_[AB]\.weight)", key):
            key = f"mixlora.layers.{m[1]}.experts.{m[3]}.{legacy_name.get(m[2], m[2])}.{m[4]}"
        legacy[key] = value
    return legacy


def assert_same_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected) or set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), name


def config_for_tiny_model(**kwargs) -> MixLoraConfig:
    return MixLoraConfig(r=R_ATTN, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
                         num_experts=E, expert_lora={"r": R}, **kwargs)  # fmt: skip


@pytest.mark.parametrize("dora", [False, True])
def test_published_keys_and_shapes(dora):
    ours = make_ours(dora=dora)
    published = to_published_state_dict(ours)
    assert {key: tuple(value.shape) for key, value in published.items()} == published_shapes(dora)
    # Spot-check values: expert e of a stacked tensor is slice e, attention and router are copied as they are.
    assert torch.equal(published["mixlora.layers.1.mlp.down_proj.experts.2.lora_B.weight"],
                       ours["model.layers.1.mlp.experts.down_proj.lora_B"][2])  # fmt: skip
    assert torch.equal(published["mixlora.layers.0.mlp.up_proj.experts.0.lora_A.weight"],
                       ours["model.layers.0.mlp.experts.up_proj.lora_A"][0])  # fmt: skip
    assert torch.equal(published["mixlora.layers.1.self_attn.v_proj.lora_B.weight"],
                       ours["model.layers.1.self_attn.v_proj.lora_B.weight"])  # fmt: skip
    assert torch.equal(published["mixlora.layers.0.mlp.moe_gate.weight"], ours["model.layers.0.mlp.moe_gate.weight"])
    if dora:
        assert torch.equal(published["mixlora.layers.0.mlp.gate_proj.experts.1.lora_magnitude_vector"],
                           ours["model.layers.0.mlp.experts.gate_proj.lora_magnitude_vector"][1])  # fmt: skip


def test_published_tensors_are_independent_contiguous_copies():
    ours = make_ours()
    # A stacked tensor stored transposed (non-contiguous) must still come out contiguous.
    ours["model.layers.0.mlp.experts.gate_proj.lora_A"] = torch.randn(E, H, R).transpose(1, 2)
    originals = {name: value.clone() for name, value in ours.items()}
    published = to_published_state_dict(ours)
    for value in published.values():
        assert value.is_contiguous()
        value.add_(1.0)
    assert_same_state(ours, originals)


@pytest.mark.parametrize("prefix", ["model.", "model.language_model.", "base_model.model.model.", ""])
def test_any_architecture_prefix_maps_to_the_same_keys(prefix):
    assert {k: tuple(v.shape) for k, v in to_published_state_dict(make_ours(prefix)).items()} == published_shapes()


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(dora, dtype):
    ours = make_ours(dora=dora, dtype=dtype)
    assert_same_state(from_published_state_dict(to_published_state_dict(ours), ours), ours)


@pytest.mark.parametrize("w_names", [False, True], ids=["proj-names", "w1-w2-w3-names"])
def test_legacy_layout_maps_to_the_same_parameters(w_names):
    ours = make_ours()
    legacy = to_legacy(to_published_state_dict(ours), w_names)
    assert "mixlora.layers.1.gate.weight" in legacy
    assert ("mixlora.layers.0.experts.2.w2_proj.lora_A.weight" if w_names
            else "mixlora.layers.0.experts.2.down_proj.lora_A.weight") in legacy  # fmt: skip
    assert_same_state(from_published_state_dict(legacy, ours), ours)


def test_missing_key():
    ours = make_ours()
    published = to_published_state_dict(ours)
    del published["mixlora.layers.1.mlp.up_proj.experts.0.lora_B.weight"]
    message = (
        "adapter checkpoint is missing 1 weight(s) the model expects: "
        f"mixlora.layers.1.mlp.up_proj.experts.0.lora_B.weight: {HINT}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        from_published_state_dict(published, ours)


def test_many_missing_keys_are_counted_and_truncated():
    # The model targets k_proj too, which the checkpoint never had: 4 keys per layer are missing.
    ours = make_ours()
    for i in range(LAYERS):
        ours[f"model.layers.{i}.self_attn.k_proj.lora_A.weight"] = torch.randn(R_ATTN, H)
        ours[f"model.layers.{i}.self_attn.k_proj.lora_B.weight"] = torch.randn(KV, R_ATTN)
    published = to_published_state_dict({k: v for k, v in ours.items() if "k_proj" not in k})
    for e in range(E):  # and the checkpoint lacks one whole expert projection in layer 1
        del published[f"mixlora.layers.1.mlp.down_proj.experts.{e}.lora_A.weight"]
    with pytest.raises(ValueError, match=r"is missing 7 weight\(s\) the model expects: "
                                         r"mixlora\.layers\.0\.self_attn\.k_proj\.lora_A\.weight, .*\(2 more\)"):
        from_published_state_dict(published, ours)


def test_missing_and_unexpected_keys_are_reported_together():
    # Trained with k_proj, loaded into a model that targets v_proj: both sides of the mismatch are named.
    ours = make_ours()
    published = {k.replace("v_proj", "k_proj"): v for k, v in to_published_state_dict(ours).items()}
    with pytest.raises(ValueError, match=r"missing 4 weight\(s\).*it also has 4 weight\(s\) the model does not "
                                         r"expect: mixlora\.layers\.0\.self_attn\.k_proj\.lora_A\.weight"):
        from_published_state_dict(published, ours)


def test_wrong_shape():
    ours = make_ours()
    published = to_published_state_dict(ours)
    published["mixlora.layers.0.mlp.gate_proj.experts.2.lora_A.weight"] = torch.randn(8, H)
    message = (
        "adapter weight mixlora.layers.0.mlp.gate_proj.experts.2.lora_A.weight has shape (8, 12) but the model "
        f"expects (5, 12): {HINT}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        from_published_state_dict(published, ours)


def test_wrong_router_shape_from_another_base_model():
    ours = make_ours()
    published = to_published_state_dict(ours)
    published["mixlora.layers.1.mlp.moe_gate.weight"] = torch.randn(E, 16)
    with pytest.raises(ValueError, match=re.escape("mixlora.layers.1.mlp.moe_gate.weight has shape (3, 16) but the "
                                                   "model expects (3, 12)")):  # fmt: skip
        from_published_state_dict(published, ours)


def test_unexpected_keys():
    # A checkpoint with 4 experts loaded into a model with 3: expert 3's tensors are left over.
    ours = make_ours()
    published = to_published_state_dict(ours)
    published["mixlora.layers.0.mlp.gate_proj.experts.3.lora_A.weight"] = torch.randn(R, H)
    published["mixlora.layers.0.mlp.gate_proj.experts.3.lora_B.weight"] = torch.randn(I, R)
    message = (
        "adapter checkpoint has 2 weight(s) the model does not expect: "
        "mixlora.layers.0.mlp.gate_proj.experts.3.lora_A.weight, "
        f"mixlora.layers.0.mlp.gate_proj.experts.3.lora_B.weight: {HINT}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        from_published_state_dict(published, ours)


def test_dora_magnitudes_are_required():
    # A published (non-DoRA-saving) checkpoint loaded into a DoRA model: the magnitudes are missing.
    ours = make_ours(dora=True)
    published = to_published_state_dict(make_ours(dora=False))
    with pytest.raises(ValueError, match=r"missing 22 weight\(s\).*DoRA magnitude vectors \(lora_magnitude_vector\) "
                                         r"are required when use_dora is on"):
        from_published_state_dict(published, ours)


def test_unmappable_names():
    ours = make_ours()
    ours["model.layers.0.mlp.gate_proj.weight"] = torch.randn(I, H)
    ours["model.embed_tokens.weight"] = torch.randn(10, H)
    message = re.escape(
        "cannot map 2 parameter name(s) to MixLoRA checkpoint keys: model.layers.0.mlp.gate_proj.weight, "
        "model.embed_tokens.weight"
    )
    with pytest.raises(ValueError, match=message):
        to_published_state_dict(ours)
    with pytest.raises(ValueError, match=message):
        from_published_state_dict({}, ours)


def test_wrong_number_of_dimensions():
    ours = make_ours()
    ours["model.layers.0.mlp.experts.up_proj.lora_A"] = torch.randn(R, H)  # not stacked over experts
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.up_proj\.lora_A has shape \(5, 12\); "
                                         r"expected 3 dimension\(s\)"):
        to_published_state_dict(ours)


def test_two_names_for_one_key():
    ours = make_ours()
    ours["model.language_model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(R_ATTN, H)
    with pytest.raises(ValueError, match=r"both map to the checkpoint key mixlora\.layers\.0\.self_attn\.q_proj\."):
        to_published_state_dict(ours)


def test_legacy_and_current_name_for_the_same_tensor():
    ours = make_ours()
    published = to_published_state_dict(ours)
    published["mixlora.layers.0.gate.weight"] = torch.randn(E, H)
    with pytest.raises(ValueError, match=r"two tensors for mixlora\.layers\.0\.mlp\.moe_gate\.weight"):
        from_published_state_dict(published, ours)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_save_and_load(tmp_path, safe_serialization):
    config = config_for_tiny_model(use_dora=True)
    ours = make_ours(dora=True, dtype=torch.bfloat16)
    published = to_published_state_dict(ours)
    weights_path = write_adapter(tmp_path / "adapter", config, published, safe_serialization=safe_serialization)
    name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    assert weights_path == os.path.join(tmp_path / "adapter", name)
    assert sorted(os.listdir(tmp_path / "adapter")) == sorted([CONFIG_NAME, name])

    for path in (tmp_path / "adapter", weights_path, tmp_path / "adapter" / CONFIG_NAME):
        loaded_config, weights = read_adapter(path)
        assert loaded_config == config
        assert_same_state(weights, published)  # bf16 LoRA and fp32 router keep their dtypes
        assert_same_state(from_published_state_dict(weights, ours), ours)


def test_safetensors_metadata(tmp_path):
    write_adapter(tmp_path, config_for_tiny_model(), to_published_state_dict(make_ours()))
    with safetensors.safe_open(tmp_path / SAFETENSORS_WEIGHTS_NAME, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_saving_one_format_removes_the_other(tmp_path):
    config = config_for_tiny_model()
    old, new = to_published_state_dict(make_ours()), to_published_state_dict(make_ours())
    write_adapter(tmp_path, config, old, safe_serialization=True)
    write_adapter(tmp_path, config, new, safe_serialization=False)
    # Otherwise read_adapter would prefer the stale safetensors file.
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert_same_state(read_adapter(tmp_path)[1], new)
    write_adapter(tmp_path, config, old, safe_serialization=True)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME])
    assert_same_state(read_adapter(tmp_path)[1], old)


def test_load_prefers_safetensors(tmp_path):
    config = config_for_tiny_model()
    first, second = to_published_state_dict(make_ours()), to_published_state_dict(make_ours())
    write_adapter(tmp_path, config, first, safe_serialization=True)
    torch.save(second, tmp_path / WEIGHTS_NAME)  # e.g. copied in by hand
    assert_same_state(read_adapter(tmp_path)[1], first)
    assert_same_state(read_adapter(tmp_path / WEIGHTS_NAME)[1], second)


def test_published_legacy_bin_checkpoint_loads(tmp_path):
    # What the published code wrote before Aug 2024: .bin of nn.Parameters, legacy keys, "mixtral" strategy.
    ours = make_ours()
    legacy = to_legacy(to_published_state_dict(ours), w_names=True)
    torch.save({k: torch.nn.Parameter(v) for k, v in legacy.items()}, tmp_path / WEIGHTS_NAME)
    config = {**config_for_tiny_model().to_dict(), "routing_strategy": "mixtral",
              "target_modules": ["q_proj", "v_proj", "w1_proj", "w2_proj", "w3_proj"]}  # fmt: skip
    del config["expert_lora"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    loaded_config, weights = read_adapter(tmp_path)
    assert loaded_config.routing_strategy == "mixlora"
    assert loaded_config.target_modules == ["q_proj", "v_proj", "gate_proj", "down_proj", "up_proj"]
    assert not any(isinstance(v, torch.nn.Parameter) for v in weights.values())
    assert_same_state(from_published_state_dict(weights, ours), ours)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_adapter(tmp_path / "nowhere")
    names = re.escape(f"'{CONFIG_NAME}' and '{SAFETENSORS_WEIGHTS_NAME}' or '{WEIGHTS_NAME}'")
    with pytest.raises(FileNotFoundError, match=f"{re.escape(repr(str(tmp_path)))} is not a complete MixLoRA "
                                                f"adapter directory: missing {names}"):  # fmt: skip
        read_adapter(tmp_path)
    config_for_tiny_model().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing '{SAFETENSORS_WEIGHTS_NAME}' or '{WEIGHTS_NAME}'")):
        read_adapter(tmp_path)
    os.remove(tmp_path / CONFIG_NAME)
    torch.save(to_published_state_dict(make_ours()), tmp_path / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing '{CONFIG_NAME}'")):
        read_adapter(tmp_path)
    config_for_tiny_model().save_pretrained(tmp_path)
    torch.save([torch.randn(2)], tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="does not hold a dict of str -> tensor"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_failed_save_leaves_the_previous_files_intact(tmp_path, monkeypatch, safe_serialization):
    config = config_for_tiny_model()
    write_adapter(tmp_path, config, to_published_state_dict(make_ours()), safe_serialization=safe_serialization)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert len(before) == 2

    written = []

    def fail_midway(obj, path, *args, **kwargs):
        # Create the output file, write part of it, then fail like a full disk would.
        with open(path, "wb") as f:
            f.write(b"partial")
        written.append(path)
        raise OSError("No space left on device")

    if safe_serialization:
        monkeypatch.setattr(safetensors.torch, "save_file", fail_midway)
    else:
        monkeypatch.setattr(torch, "save", fail_midway)
    with pytest.raises(OSError, match="No space left on device"):
        write_adapter(tmp_path, config_for_tiny_model(lora_alpha=8), to_published_state_dict(make_ours()),
                     safe_serialization=safe_serialization)  # fmt: skip

    assert len(written) == 1 and os.path.dirname(written[0]) == str(tmp_path)  # temp file in the same directory
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no temporary file left behind
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert read_adapter(tmp_path)[0] == config


def _cut(data: bytes) -> bytes:
    return data[:len(data) // 2]


@pytest.mark.parametrize("safe_serialization, damage, problem", [
    (False, _cut, "is truncated or not a PyTorch file"),  # PytorchStreamReader / OSError underneath
    (False, lambda data: b"", "is empty"),  # EOFError underneath
    (False, lambda data: os.urandom(len(data)), "is truncated or not a PyTorch file"),  # UnpicklingError underneath
    (True, _cut, "is truncated or not a safetensors file (Error while deserializing header"),  # SafetensorError
    (True, lambda data: os.urandom(len(data)), "is truncated or not a safetensors file"),
])
def test_unreadable_weights_raise_adapter_file_error_naming_the_file(tmp_path, safe_serialization, damage, problem):
    from mixlora.checkpoint import AdapterFileError

    path = write_adapter(tmp_path, config_for_tiny_model(), to_published_state_dict(make_ours()),
                        safe_serialization=safe_serialization)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(AdapterFileError) as info:
        read_adapter(tmp_path)
    assert str(info.value).startswith(f"{path}: {problem}"), info.value
    assert info.value.path == path and isinstance(info.value, ValueError)


def test_pickled_objects_and_a_binary_config_raise_adapter_file_error(tmp_path):
    from mixlora.checkpoint import AdapterFileError

    config_for_tiny_model().save_pretrained(tmp_path)
    torch.save({"a": torch.zeros(1), "b": datetime.date(2026, 12, 1)}, tmp_path / WEIGHTS_NAME)  # not a tensor
    with pytest.raises(AdapterFileError, match="holds objects other than tensors, which a weights-only load refuses"):
        read_adapter(tmp_path)
    # The weights file given where the config is expected (MixLoraConfig.from_pretrained reads a file path as is).
    torch.save(to_published_state_dict(make_ours()), tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterFileError, match=re.escape(f"{tmp_path / WEIGHTS_NAME}: is not a text file")):
        MixLoraConfig.from_pretrained(tmp_path / WEIGHTS_NAME)
