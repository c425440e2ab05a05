import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from loratune.config import LoraSettings, ModelConfig
from loratune.models.loading import ModelLoadError, detect_family, load_model, resolve_model_path
from loratune.models.lora import attach_lora, build_lora_config, default_target_modules


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
