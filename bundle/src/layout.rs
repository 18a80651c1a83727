//! Tensor names and shapes of a Mistral/Llama model, and what a bundle stores of them. A bundle
//! names its tensors as HuggingFace checkpoints do, so these lists serve the exporter (what a
//! checkpoint must contain, what it writes: [`stored_tensors`]), the bundle check (what a
//! bundle must contain) and the engine (which initializer is which).

use super::manifest::{Architecture, QuantKind, Quantization, TensorDtype};

/// What a tensor is for, which decides how it is stored in a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `[vocab, hidden]`, looked up by token id.
    Embedding,
    /// `[out_features, in_features]`, used as `x · Wᵀ`.
    Linear,
    /// `[hidden]` RMSNorm gain.
    Norm,
    /// `[out_features]` added after a linear layer's product; stored f32 like a norm.
    Bias,
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

/// HF name of the bias of layer `layer`'s `module`, e.g. `layer_bias(3, "self_attn.q_proj")`.
pub fn layer_bias(layer: usize, module: &str) -> String {
    format!("model.layers.{layer}.{module}.bias")
}

/// The projections that carry a bias when `Architecture::attention_bias` is set.
pub const BIASED_MODULES: [&str; 3] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"];

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
/// The rotary cosine cache, f32 `[max_context, head_dim / 2]` ([`Architecture::max_context`]).
pub const ROPE_COS: &str = "rope.cos_cache";
/// The rotary sine cache, f32 `[max_context, head_dim / 2]`.
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
            if arch.attention_bias && BIASED_MODULES.contains(&module) {
                out.push(ExpectedTensor {
                    name: layer_bias(layer, module),
                    shape: vec![shape[0]],
                    role: Role::Bias,
                });
            }
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

/// One tensor as a bundle stores it in `model.weights`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
}

/// A stored tensor and, when FP8, its f32 scales (`{name}_scale`): `[rows]`, one per output
/// channel, or `[rows, cols / block_size]`, one per block of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scaled {
    pub tensor: StoredTensor,
    pub scale: Option<StoredTensor>,
}

/// What a bundle stores of one checkpoint tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWeight {
    /// The checkpoint tensor it is made from.
    pub source: ExpectedTensor,
    /// The tensor itself, under the same name: f32 for a norm or a bias, the quantization's
    /// dtype otherwise.
    pub stored: Scaled,
    /// The head's FP8 rounding error (`{name}.residual`) when the quantization asks for it.
    pub residual: Option<Scaled>,
}

/// Every tensor of a bundle for an architecture and a quantization: the weights, embedding
/// first and LM head last, then the rotary caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensors {
    pub weights: Vec<StoredWeight>,
    /// [`ROPE_COS`] and [`ROPE_SIN`], f32 `[max_context, head_dim / 2]`.
    pub rope: [StoredTensor; 2],
}

impl StoredTensors {
    /// Each stored tensor with the name of the tensor it scales, if it is a scale: a weight,
    /// its scale, its residual and the residual's scale, weight after weight, then the rotary
    /// caches.
    pub fn all(&self) -> impl Iterator<Item = (&StoredTensor, Option<&str>)> {
        self.weights
            .iter()
            .flat_map(|w| std::iter::once(&w.stored).chain(&w.residual))
            .flat_map(|s| {
                let scaled = s.tensor.name.as_str();
                std::iter::once((&s.tensor, None))
                    .chain(s.scale.iter().map(move |t| (t, Some(scaled))))
            })
            .chain(self.rope.iter().map(|t| (t, None)))
    }
}

/// Why a quantization cannot be stored for an architecture.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantizationError {
    #[error("head_residual is only defined for FP8 bundles")]
    HeadResidualWithoutFp8,
    #[error("block_size {block} does not divide {cols} of tensor {tensor}")]
    BlockSize {
        tensor: String,
        block: usize,
        cols: usize,
    },
}

/// The tensors a bundle of `arch` (validated) stores under `quant`: what the exporter writes
/// and what `Bundle::open` checks the tensor table against.
pub fn stored_tensors(
    arch: &Architecture,
    quant: &Quantization,
) -> Result<StoredTensors, QuantizationError> {
    let fp8 = quant.kind == QuantKind::Fp8E4m3fn;
    if quant.head_residual && !fp8 {
        return Err(QuantizationError::HeadResidualWithoutFp8);
    }
    let scaled = |name: String, shape: &[usize]| -> Result<Scaled, QuantizationError> {
        let scale = if fp8 {
            let (rows, cols) = (shape[0], shape[1]);
            let scale_shape = match quant.block_size {
                None => vec![rows],
                Some(block) if block > 0 && cols.is_multiple_of(block) => {
                    vec![rows, cols / block]
                }
                Some(block) => {
                    return Err(QuantizationError::BlockSize {
                        tensor: name,
                        block,
                        cols,
                    });
                }
            };
            Some(StoredTensor {
                name: format!("{name}{SCALE_SUFFIX}"),
                dtype: TensorDtype::F32,
                shape: scale_shape,
            })
        } else {
            None
        };
        Ok(Scaled {
            tensor: StoredTensor {
                name,
                dtype: quant.kind.stored_dtype(),
                shape: shape.to_vec(),
            },
            scale,
        })
    };
    let head = head_tensor(arch);
    let mut weights = Vec::new();
    for source in expected_tensors(arch) {
        let (stored, residual) = if matches!(source.role, Role::Norm | Role::Bias) {
            let norm = StoredTensor {
                name: source.name.clone(),
                dtype: TensorDtype::F32,
                shape: source.shape.clone(),
            };
            let stored = Scaled {
                tensor: norm,
                scale: None,
            };
            (stored, None)
        } else {
            let stored = scaled(source.name.clone(), &source.shape)?;
            let residual = (quant.head_residual && source.name == head)
                .then(|| {
                    scaled(
                        format!("{}{HEAD_RESIDUAL_SUFFIX}", source.name),
                        &source.shape,
                    )
                })
                .transpose()?;
            (stored, residual)
        };
        weights.push(StoredWeight {
            source,
            stored,
            residual,
        });
    }
    let rope = |name: &str| StoredTensor {
        name: name.to_owned(),
        dtype: TensorDtype::F32,
        shape: vec![arch.max_context(), arch.head_dim / 2],
    };
    Ok(StoredTensors {
        weights,
        rope: [rope(ROPE_COS), rope(ROPE_SIN)],
    })
}
