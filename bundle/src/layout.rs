//! Tensor names and shapes of a Mistral/Llama model. A bundle names its tensors as HuggingFace
//! checkpoints do, so this one list serves the exporter (what a checkpoint must contain), the
//! bundle check (what a bundle must contain) and the engine (which initializer is which).

use super::manifest::Architecture;

/// What a tensor is for, which decides how it is stored in a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `[vocab, hidden]`, looked up by token id.
    Embedding,
    /// `[out_features, in_features]`, used as `x · Wᵀ`.
    Linear,
    /// `[hidden]` RMSNorm gain.
    Norm,
}

/// One tensor the checkpoint must contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
}

/// HF name of the token embedding; also the LM head when embeddings are tied.
pub const EMBEDDING: &str = "model.embed_tokens.weight";
/// HF name of the final norm.
pub const FINAL_NORM: &str = "model.norm.weight";
/// HF name of an untied LM head.
pub const LM_HEAD: &str = "lm_head.weight";

/// The tensor the logits are computed from: the LM head, or the embedding when tied.
pub fn head_tensor(arch: &Architecture) -> &'static str {
    if arch.tie_word_embeddings {
        EMBEDDING
    } else {
        LM_HEAD
    }
}

/// Suffix of the head's FP8 residual (see `Quantization::head_residual`): the head is used as
/// `W + W.residual`, each an FP8 tensor with its own scales.
pub const HEAD_RESIDUAL_SUFFIX: &str = ".residual";

/// HF name of a tensor of layer `layer`, e.g. `layer_tensor(3, "self_attn.q_proj")`.
pub fn layer_tensor(layer: usize, module: &str) -> String {
    format!("model.layers.{layer}.{module}.weight")
}

/// The per-layer modules, in the order HF stores them.
pub const LAYER_MODULES: [&str; 9] = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Suffix of a quantized tensor's scale: `W` is dequantized with `W` + `SCALE_SUFFIX`.
pub const SCALE_SUFFIX: &str = "_scale";
/// The rotary cosine cache, f32 `[context_length, head_dim / 2]`.
pub const ROPE_COS: &str = "rope.cos_cache";
/// The rotary sine cache, f32 `[context_length, head_dim / 2]`.
pub const ROPE_SIN: &str = "rope.sin_cache";

/// Every weight tensor of the model, embedding first and LM head last.
pub fn expected_tensors(arch: &Architecture) -> Vec<ExpectedTensor> {
    let h = arch.hidden_size;
    let q = arch.num_heads * arch.head_dim;
    let kv = arch.num_kv_heads * arch.head_dim;
    let m = arch.intermediate_size;
    let mut out = vec![ExpectedTensor {
        name: EMBEDDING.to_owned(),
        shape: vec![arch.vocab_size, h],
        role: Role::Embedding,
    }];
    for layer in 0..arch.num_layers {
        for module in LAYER_MODULES {
            let (shape, role) = match module {
                "input_layernorm" | "post_attention_layernorm" => (vec![h], Role::Norm),
                "self_attn.q_proj" => (vec![q, h], Role::Linear),
                "self_attn.k_proj" | "self_attn.v_proj" => (vec![kv, h], Role::Linear),
                "self_attn.o_proj" => (vec![h, q], Role::Linear),
                "mlp.gate_proj" | "mlp.up_proj" => (vec![m, h], Role::Linear),
                _ => (vec![h, m], Role::Linear),
            };
            out.push(ExpectedTensor {
                name: layer_tensor(layer, module),
                shape,
                role,
            });
        }
    }
    out.push(ExpectedTensor {
        name: FINAL_NORM.to_owned(),
        shape: vec![h],
        role: Role::Norm,
    });
    if !arch.tie_word_embeddings {
        out.push(ExpectedTensor {
            name: LM_HEAD.to_owned(),
            shape: vec![arch.vocab_size, h],
            role: Role::Linear,
        });
    }
    out
}
