//! The ONNX graph of a bundle, exactly as `ARCHITECTURE.md` ("The graph") specifies it: opset 23
//! `RMSNormalization`, `RotaryEmbedding` and `Attention` with explicit past/present KV, every
//! weight an external initializer in `model.weights`. The names and weight patterns the engine
//! relies on are the bundle crate's ([`marengo_bundle::graph`]); this module only writes them.
//!
//! Weights stay `[out, in]` as HuggingFace stores them and are used through
//! `Transpose(perm=[1,0])` → `MatMul`, so that one output channel's bytes are contiguous for the
//! engine's FP8 kernels and a tied embedding can serve as the LM head unchanged.

use std::collections::HashMap;

use marengo_bundle::graph::{
    ADD, AXIS, BATCH, BLOCK_SIZE, DEQUANTIZE_LINEAR, GATHER, INPUT_IDS, IR_VERSION, Kv, LOGITS,
    MATMUL, OPSET, PAST_SEQUENCE, PERM, POSITION_IDS, SEQUENCE, TOTAL_SEQUENCE, TRANSPOSE,
    TRANSPOSE_PERM, WINDOW_MASK, past_name, present_name,
};
use marengo_bundle::layout::{
    BIASED_MODULES, EMBEDDING, FINAL_NORM, HEAD_RESIDUAL_SUFFIX, ROPE_COS, ROPE_SIN, SCALE_SUFFIX,
    head_tensor, layer_bias, layer_tensor,
};
use marengo_bundle::manifest::{Architecture, RopeScaling, TensorDtype, TensorEntry, WEIGHTS_FILE};
use marengo_bundle::onnx::{
    AttributeProto, DataType, Dim, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, ValueInfoProto,
};

/// Why a graph cannot be built over the written tensors (a bug in the exporter if it happens).
#[derive(Debug, thiserror::Error)]
#[error("graph: tensor {0} was not written to the bundle")]
pub struct MissingTensor(String);

/// Builds the graph over `tensors` (the bundle's tensor table).
pub fn build(
    arch: &Architecture,
    tensors: &[TensorEntry],
    producer_version: &str,
) -> Result<ModelProto, MissingTensor> {
    let mut g = Builder {
        nodes: Vec::new(),
        tensors: tensors.iter().map(|t| (t.name.as_str(), t)).collect(),
        dequantized: HashMap::new(),
    };
    let eps = arch.rms_norm_eps as f32;
    let mask = match arch.sliding_window {
        Some(window) if window < arch.max_context() => g.window_mask(window),
        _ => String::new(),
    };

    let mut hidden = g.gather(EMBEDDING, "embed")?;
    for layer in 0..arch.num_layers {
        let p = format!("layers.{layer}");
        let gain = g.tensor(&layer_tensor(layer, "input_layernorm"))?;
        let normed = g.rms_norm(&format!("{p}.input_norm"), &hidden, &gain, eps);
        let mut qkv = Vec::with_capacity(BIASED_MODULES.len());
        for module in BIASED_MODULES {
            let product = g.linear(&normed, &layer_tensor(layer, module))?;
            qkv.push(if arch.attention_bias {
                let bias = g.tensor(&layer_bias(layer, module))?;
                g.node(
                    ADD,
                    &format!("model.layers.{layer}.{module}.biased"),
                    &[&product, &bias],
                    vec![],
                )
            } else {
                product
            });
        }
        let [q, k, v]: [String; 3] = qkv.try_into().expect("three projections");
        let rope = |g: &mut Builder, x: &str, heads: usize, what: &str| {
            g.node(
                "RotaryEmbedding",
                &format!("{p}.rope_{what}"),
                &[x, ROPE_COS, ROPE_SIN, POSITION_IDS],
                vec![
                    AttributeProto::int("interleaved", 0),
                    AttributeProto::int("num_heads", heads as i64),
                ],
            )
        };
        let q = rope(&mut g, &q, arch.num_heads, "q");
        let k = rope(&mut g, &k, arch.num_kv_heads, "k");
        let (past_k, past_v) = (past_name(layer, Kv::Key), past_name(layer, Kv::Value));
        let (present_k, present_v) = (present_name(layer, Kv::Key), present_name(layer, Kv::Value));
        let attn_out = format!("{p}.attention");
        g.nodes.push(NodeProto {
            name: attn_out.clone(),
            op_type: "Attention".into(),
            input: [&q, &k, &v, &mask, &past_k, &past_v]
                .map(|s| s.to_string())
                .to_vec(),
            output: vec![attn_out.clone(), present_k, present_v],
            attribute: vec![
                AttributeProto::int("is_causal", 1),
                AttributeProto::int("q_num_heads", arch.num_heads as i64),
                AttributeProto::int("kv_num_heads", arch.num_kv_heads as i64),
            ],
            ..Default::default()
        });
        let o = g.linear(&attn_out, &layer_tensor(layer, "self_attn.o_proj"))?;
        hidden = g.node(ADD, &format!("{p}.attn_residual"), &[&hidden, &o], vec![]);

        let gain = g.tensor(&layer_tensor(layer, "post_attention_layernorm"))?;
        let normed = g.rms_norm(&format!("{p}.post_attention_norm"), &hidden, &gain, eps);
        let gate = g.linear(&normed, &layer_tensor(layer, "mlp.gate_proj"))?;
        let up = g.linear(&normed, &layer_tensor(layer, "mlp.up_proj"))?;
        let sigmoid = g.node("Sigmoid", &format!("{p}.mlp.sigmoid"), &[&gate], vec![]);
        let silu = g.node("Mul", &format!("{p}.mlp.silu"), &[&gate, &sigmoid], vec![]);
        let gated = g.node("Mul", &format!("{p}.mlp.gated"), &[&silu, &up], vec![]);
        let down = g.linear(&gated, &layer_tensor(layer, "mlp.down_proj"))?;
        hidden = g.node(ADD, &format!("{p}.mlp_residual"), &[&hidden, &down], vec![]);
    }
    let gain = g.tensor(FINAL_NORM)?;
    let normed = g.rms_norm("final_norm", &hidden, &gain, eps);
    let logits = g.linear(&normed, head_tensor(arch))?;
    g.nodes.push(NodeProto {
        name: LOGITS.into(),
        op_type: "Identity".into(),
        input: vec![logits],
        output: vec![LOGITS.into()],
        ..Default::default()
    });

    let batch = || Dim::Symbol(BATCH.into());
    let seq = || Dim::Symbol(SEQUENCE.into());
    let kv_dims = |len: &str| {
        vec![
            batch(),
            Dim::Fixed(arch.num_kv_heads as i64),
            Dim::Symbol(len.into()),
            Dim::Fixed(arch.head_dim as i64),
        ]
    };
    let mut input = vec![
        ValueInfoProto::tensor(INPUT_IDS, DataType::Int64, &[batch(), seq()]),
        ValueInfoProto::tensor(POSITION_IDS, DataType::Int64, &[batch(), seq()]),
    ];
    let mut output = vec![ValueInfoProto::tensor(
        LOGITS,
        DataType::Float,
        &[batch(), seq(), Dim::Fixed(arch.vocab_size as i64)],
    )];
    for layer in 0..arch.num_layers {
        for kv in Kv::BOTH {
            input.push(ValueInfoProto::tensor(
                &past_name(layer, kv),
                DataType::Float,
                &kv_dims(PAST_SEQUENCE),
            ));
            output.push(ValueInfoProto::tensor(
                &present_name(layer, kv),
                DataType::Float,
                &kv_dims(TOTAL_SEQUENCE),
            ));
        }
    }
    let initializer = tensors
        .iter()
        .map(|t| {
            let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            TensorProto::external(
                &t.name,
                t.dtype.into(),
                &dims,
                WEIGHTS_FILE,
                t.offset,
                t.length,
            )
        })
        .collect();

    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "marengo-export".into(),
        producer_version: producer_version.into(),
        graph: Some(GraphProto {
            name: format!("{}-causal-lm", arch.family),
            node: g.nodes,
            initializer,
            input,
            output,
            ..Default::default()
        }),
        ..Default::default()
    })
}

struct Builder<'a> {
    nodes: Vec<NodeProto>,
    tensors: HashMap<&'a str, &'a TensorEntry>,
    /// Weight name → name of its f32 value in the graph, so that a tied LM head reuses the
    /// embedding's dequantization.
    dequantized: HashMap<String, String>,
}

impl Builder<'_> {
    /// Adds a single-output node whose output is named after the node; returns that name.
    fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
        self.nodes.push(NodeProto {
            name: name.to_owned(),
            op_type: op_type.to_owned(),
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![name.to_owned()],
            attribute,
            ..Default::default()
        });
        name.to_owned()
    }

    /// [`WINDOW_MASK`] for a window of `window` positions: the distance from each query's
    /// position (`position_ids`) to each key's (`0..past + new`), kept where it is in
    /// `0..window`. Causality is in it too, so that it means the same however an engine
    /// combines it with `is_causal`.
    fn window_mask(&mut self, window: usize) -> String {
        let int = |value: i64| vec![AttributeProto::int("value_int", value)];
        let ints = |values: &[i64]| vec![AttributeProto::ints("value_ints", values)];
        let zero = self.node("Constant", "window.zero", &[], int(0));
        let one = self.node("Constant", "window.one", &[], int(1));
        let width = self.node("Constant", "window.width", &[], int(window as i64));
        let first_axis = self.node("Constant", "window.first_axis", &[], ints(&[0]));
        let query_axes = self.node("Constant", "window.query_axes", &[], ints(&[1, 3]));
        let seen = self.node(
            "Constant",
            "window.seen",
            &[],
            vec![AttributeProto::float("value_float", 0.0)],
        );
        let hidden = self.node(
            "Constant",
            "window.hidden",
            &[],
            vec![AttributeProto::float("value_float", f32::NEG_INFINITY)],
        );
        let shape = |start: i64| {
            vec![
                AttributeProto::int("start", start),
                AttributeProto::int("end", start + 1),
            ]
        };
        let past = self.node("Shape", "window.past", &[&past_name(0, Kv::Key)], shape(2));
        let new = self.node("Shape", "window.new", &[INPUT_IDS], shape(1));
        let total = self.node(ADD, "window.total", &[&past, &new], vec![]);
        let total = self.node(
            "Squeeze",
            "window.total_scalar",
            &[&total, &first_axis],
            vec![],
        );
        let keys = self.node(
            "Range",
            "window.key_positions",
            &[&zero, &total, &one],
            vec![],
        );
        let queries = self.node(
            "Unsqueeze",
            "window.query_positions",
            &[POSITION_IDS, &query_axes],
            vec![],
        );
        let distance = self.node("Sub", "window.distance", &[&queries, &keys], vec![]);
        let within = self.node("Less", "window.within", &[&distance, &width], vec![]);
        let behind = self.node(
            "GreaterOrEqual",
            "window.behind",
            &[&distance, &zero],
            vec![],
        );
        let seen_keys = self.node("And", "window.seen_keys", &[&within, &behind], vec![]);
        self.nodes.push(NodeProto {
            name: WINDOW_MASK.into(),
            op_type: "Where".into(),
            input: vec![seen_keys, seen, hidden],
            output: vec![WINDOW_MASK.into()],
            ..Default::default()
        });
        WINDOW_MASK.to_owned()
    }

    fn tensor(&self, name: &str) -> Result<String, MissingTensor> {
        self.tensors
            .contains_key(name)
            .then(|| name.to_owned())
            .ok_or_else(|| MissingTensor(name.to_owned()))
    }

    fn rms_norm(&mut self, name: &str, x: &str, gain: &str, eps: f32) -> String {
        self.node(
            "RMSNormalization",
            name,
            &[x, gain],
            vec![
                AttributeProto::int("axis", -1),
                AttributeProto::float("epsilon", eps),
            ],
        )
    }

    /// The f32 value of a `[out, in]` weight: `DequantizeLinear` (FP8), `Cast` (f16) or the
    /// initializer itself (f32).
    fn weight(&mut self, name: &str) -> Result<String, MissingTensor> {
        if let Some(done) = self.dequantized.get(name) {
            return Ok(done.clone());
        }
        let entry = *self
            .tensors
            .get(name)
            .ok_or_else(|| MissingTensor(name.to_owned()))?;
        let value = match entry.dtype {
            TensorDtype::Fp8E4m3fn => {
                let scale_name = format!("{name}{SCALE_SUFFIX}");
                let scale = *self
                    .tensors
                    .get(scale_name.as_str())
                    .ok_or_else(|| MissingTensor(scale_name.clone()))?;
                let attribute = match scale.shape.as_slice() {
                    [_, groups] => vec![
                        AttributeProto::int(AXIS, 1),
                        AttributeProto::int(BLOCK_SIZE, (entry.shape[1] / groups) as i64),
                    ],
                    _ => vec![AttributeProto::int(AXIS, 0)],
                };
                self.node(
                    DEQUANTIZE_LINEAR,
                    &format!("{name}.dequantized"),
                    &[name, &scale_name],
                    attribute,
                )
            }
            TensorDtype::F16 => self.node(
                "Cast",
                &format!("{name}.f32"),
                &[name],
                vec![AttributeProto::int("to", DataType::Float as i64)],
            ),
            TensorDtype::F32 => name.to_owned(),
        };
        self.dequantized.insert(name.to_owned(), value.clone());
        Ok(value)
    }

    /// The FP8 residual that completes `name`, if the bundle has one (the head's).
    fn residual_of(&self, name: &str) -> Option<String> {
        let residual = format!("{name}{HEAD_RESIDUAL_SUFFIX}");
        self.tensors
            .contains_key(residual.as_str())
            .then_some(residual)
    }

    /// The rows of the `[vocab, hidden]` weight `name` for the input ids. With a residual,
    /// each part is looked up and the rows are added, so that either stays a plain FP8 lookup.
    fn gather(&mut self, name: &str, node: &str) -> Result<String, MissingTensor> {
        let rows = self.gather_one(name, node)?;
        let Some(residual) = self.residual_of(name) else {
            return Ok(rows);
        };
        let rest = self.gather_one(&residual, &format!("{node}.residual"))?;
        Ok(self.node(ADD, &format!("{node}.sum"), &[&rows, &rest], vec![]))
    }

    fn gather_one(&mut self, name: &str, node: &str) -> Result<String, MissingTensor> {
        let table = self.weight(name)?;
        Ok(self.node(
            GATHER,
            node,
            &[&table, INPUT_IDS],
            vec![AttributeProto::int(AXIS, 0)],
        ))
    }

    /// `x · Wᵀ` for the `[out, in]` weight `name`; with a residual `R`, `x · Wᵀ + x · Rᵀ`,
    /// two products of the kind the engine runs straight from FP8.
    fn linear(&mut self, x: &str, name: &str) -> Result<String, MissingTensor> {
        let product = self.linear_one(x, name)?;
        let Some(residual) = self.residual_of(name) else {
            return Ok(product);
        };
        let rest = self.linear_one(x, &residual)?;
        let module = name.strip_suffix(".weight").unwrap_or(name);
        Ok(self.node(
            ADD,
            &format!("{module}.output_sum"),
            &[&product, &rest],
            vec![],
        ))
    }

    fn linear_one(&mut self, x: &str, name: &str) -> Result<String, MissingTensor> {
        let w = self.weight(name)?;
        let transposed = self.node(
            TRANSPOSE,
            &format!("{name}.transposed"),
            &[&w],
            vec![AttributeProto::ints(PERM, &TRANSPOSE_PERM)],
        );
        let module = name.strip_suffix(".weight").unwrap_or(name);
        Ok(self.node(
            MATMUL,
            &format!("{module}.output"),
            &[x, &transposed],
            vec![],
        ))
    }
}

/// Rotary caches `[max_context, head_dim / 2]`, for any context a run may choose: cos and sin of `position · θ^(−2j/head_dim)`,
/// HuggingFace's non-interleaved (`rotate_half`) convention, with the architecture's rope
/// scaling folded into the frequencies. Computed in f64, stored as f32.
pub fn rope_caches(arch: &Architecture) -> (Vec<f32>, Vec<f32>) {
    let half = arch.head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|j| {
            arch.rope_theta
                .powf(-((2 * j) as f64) / arch.head_dim as f64)
        })
        .collect();
    let inv_freq = match &arch.rope_scaling {
        None => inv_freq,
        Some(scaling) => scaled_frequencies(scaling, &inv_freq),
    };
    let positions = arch.max_context();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for position in 0..positions {
        for f in &inv_freq {
            let angle = position as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// The rotary frequencies after `scaling`, as transformers' `ROPE_INIT_FUNCTIONS` compute
/// them (`linear`, `llama3`) and llama.cpp applies `rope_freqs.weight` (a divisor each).
pub fn scaled_frequencies(scaling: &RopeScaling, inv_freq: &[f64]) -> Vec<f64> {
    match scaling {
        RopeScaling::Linear { factor } => inv_freq.iter().map(|f| f / factor).collect(),
        RopeScaling::Divisors { divisors } => {
            inv_freq.iter().zip(divisors).map(|(f, d)| f / d).collect()
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let original = *original_max_position_embeddings as f64;
            let low_freq_wavelen = original / low_freq_factor;
            let high_freq_wavelen = original / high_freq_factor;
            inv_freq
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (original / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's converter writes Llama 3's scaling as one divisor per frequency
    /// (`rope_freqs.weight`, from `generate_extra_tensors`: 1, `factor`, or
    /// `1 / ((1 − smooth) / factor + smooth)`); a GGUF model then rotates by the same angles
    /// as its HF directory.
    #[test]
    fn gguf_divisors_give_llama3_frequencies() {
        let (factor, low, high, original) = (8.0, 1.0, 4.0, 8192.0);
        let inv_freq: Vec<f64> = (0..64)
            .map(|j| 500_000f64.powf(-(j as f64) / 64.0))
            .collect();
        let divisors = inv_freq
            .iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < original / high {
                    1.0
                } else if wavelen > original / low {
                    factor
                } else {
                    let smooth = (original / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect();
        let llama3 = scaled_frequencies(
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original as usize,
            },
            &inv_freq,
        );
        let gguf = scaled_frequencies(&RopeScaling::Divisors { divisors }, &inv_freq);
        let kept = inv_freq.iter().zip(&llama3).filter(|(a, b)| a == b).count();
        assert!(
            kept > 0 && kept < inv_freq.len(),
            "all three branches are met"
        );
        for (a, b) in llama3.iter().zip(&gguf) {
            assert!((a - b).abs() <= 1e-12 * a.abs(), "{a} != {b}");
        }
    }
}
