import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from loratune.config import LoraSettings, ModelConfig
from loratune.models.loading import ModelLoadError, detect_family, load_model, resolve_model_path
from loratune.models.lora import attach_lora, build_lora_config, default_target_modules, keep_lora_branch_fp32


def test_default_targets_by_architecture(tiny_t5_dir, tiny_llama_dir):
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert default_target_modules(t5) == ["q", "v"]
    assert default_target_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_unknown_target_module_is_named(tiny_llama_dir):
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"lora.target_modules: \['qkv'\] not found"):
        build_lora_config(LoraSettings(target_modules=["qkv"]), llama, "causal")


def test_lora_switches_reach_peft(tiny_llama_dir):
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = build_lora_config(LoraSettings(r=4, alpha=8, use_dora=True, use_rslora=True), llama, "causal")
    assert (config.r, config.lora_alpha, config.use_dora, config.use_rslora) == (4, 8, True, True)


def test_only_lora_parameters_are_trainable(tiny_llama_dir):
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = attach_lora(llama, LoraSettings(r=4), "causal")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in name for name in trainable), trainable


def test_family_detection(tiny_t5_dir, tiny_llama_dir):
    assert load_model(ModelConfig(name_or_path=str(tiny_t5_dir))).family == "seq2seq"
    assert load_model(ModelConfig(name_or_path=str(tiny_llama_dir))).family == "causal"
    assert detect_family(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config) == "causal"


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a model folder: it has no config.json"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path)))


def test_kbit_without_cuda_is_rejected(tiny_llama_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = ModelConfig(name_or_path=str(tiny_llama_dir), quantization="int8")
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_model(config)


def test_missing_gguf_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "model.gguf")))


def _young_adapter_layer(tiny_llama_dir, use_dora: bool = False):
    """A LoRA q_proj whose branch adds about 0.1% to the frozen output, as early in training."""
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    settings = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=["q_proj"], use_dora=use_dora)
    model = attach_lora(llama, settings, "causal").eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.manual_seed(0)
    with torch.no_grad():
        layer.base_layer.weight.normal_(0, 1)
        layer.lora_A["default"].weight.normal_(0, 1)
        layer.lora_B["default"].weight.normal_(0, 1e-3 / 4)
    return model, layer


def _branch_error(layer, x) -> float:
    """Relative error, under bf16 autocast, of the LoRA branch as it shows in the layer output."""
    with torch.no_grad():
        reference = layer(x) - layer.base_layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seen = layer(x).float() - layer.base_layer(x).float()
    return ((seen - reference).norm() / reference.norm()).item()


def test_fp32_branch_keeps_small_updates(tiny_llama_dir):
    model, layer = _young_adapter_layer(tiny_llama_dir)
    x = torch.randn(4, 16, layer.in_features)
    # PEFT alone adds the branch to the bf16 output in bf16 and loses most of it.
    assert _branch_error(layer, x) > 0.1
    assert keep_lora_branch_fp32(model) == model.config.num_hidden_layers
    assert _branch_error(layer, x) < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.requires_grad_())
    assert out.dtype == torch.float32
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_fp32_branch_fp32_and_dora(tiny_llama_dir):
    model, layer = _young_adapter_layer(tiny_llama_dir)
    x = torch.randn(2, 8, layer.in_features)
    with torch.no_grad():
        before = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
        keep_lora_branch_fp32(model)
        after = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    dora_model, dora_layer = _young_adapter_layer(tiny_llama_dir, use_dora=True)
    keep_lora_branch_fp32(dora_model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(dora_layer(x)).all()
