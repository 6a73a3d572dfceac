"""Tiny random transformers models of every supported type, saved to disk: the reference we must match."""
import torch
import transformers

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)

# name -> (transformers config class, extra fields)
CASES = {
    "llama": (transformers.LlamaConfig, {}),
    "llama-linear": (transformers.LlamaConfig, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-dynamic": (transformers.LlamaConfig, {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama-yarn": (transformers.LlamaConfig, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 32}}),
    "llama3": (transformers.LlamaConfig, {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "llama-bias-tied": (transformers.LlamaConfig, {"attention_bias": True, "mlp_bias": True,
                                                   "tie_word_embeddings": True, "num_key_value_heads": 4}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None, "head_dim": 16}),
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "glm": (transformers.GlmConfig, {"head_dim": 32, "partial_rotary_factor": 0.5}),
}


def make_hf_model(name, seed=0):
    cls, extra = CASES[name]
    cfg = cls(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random everything, biases and norms included, so that each one is tested
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model


def save_hf_model(name, path, seed=0):
    model = make_hf_model(name, seed)
    model.save_pretrained(path)
    return model
