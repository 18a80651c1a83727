//! Deterministic random HuggingFace checkpoints: the tests' tiny models and the 7B-shaped
//! benchmark input, without downloading anything.
//!
//! Every tensor has its own ChaCha8 stream seeded from SHA-256 of (seed, tensor name), so values
//! depend neither on the shard layout nor on the machine: uniform draws are built from the top
//! 24 bits of a `u32` (exact in f32) and scaled with correctly rounded IEEE operations only.
//! Scales keep a forward pass well conditioned: linear weights ~ U(-1,1)/√in_features,
//! norm gains ~ 1 ± 0.1, embeddings ~ U(-1,1)·0.5.
//!
//! Tensors are generated one at a time while the safetensors file is written, so peak memory is
//! the largest tensor, whatever the model size.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::checkpoint::{ConfigError, ModelConfig, SourceDtype};
use crate::hf_writer::{CheckpointWriter, HfWriteError, ShardTensor, safetensors_order};
use marengo_bundle::layout::{ExpectedTensor, Role, expected_tensors};

/// What to synthesize.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// A HuggingFace `config.json`; copied verbatim into the checkpoint.
    pub config: PathBuf,
    pub out: PathBuf,
    pub seed: u64,
    /// Storage dtype; defaults to the config's `torch_dtype`/`dtype`, else bf16.
    pub dtype: Option<SourceDtype>,
    /// Number of safetensors files; more than one adds `model.safetensors.index.json`.
    pub shards: usize,
    /// A `tokenizer.json` to copy in.
    pub tokenizer: Option<PathBuf>,
}

/// Why a checkpoint could not be synthesized.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--shards {shards}: must be between 1 and the number of tensors ({tensors})")]
    Shards { shards: usize, tensors: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] HfWriteError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a random checkpoint for `opts.config` into `opts.out` (created if needed).
pub fn synthesize(opts: &SynthOptions) -> Result<(), SynthError> {
    let config_text = std::fs::read_to_string(&opts.config).map_err(io_err(&opts.config))?;
    let config = ModelConfig::from_json(&opts.config, &config_text)?;
    let dtype = opts.dtype.or(config.dtype).unwrap_or(SourceDtype::Bf16);
    let tensors = expected_tensors(&config.architecture);
    if opts.shards == 0 || opts.shards > tensors.len() {
        return Err(SynthError::Shards {
            shards: opts.shards,
            tensors: tensors.len(),
        });
    }
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;

    let writer = CheckpointWriter::new(&opts.out);
    let shards: Vec<Vec<RandomTensor>> = split_into_shards(&tensors, dtype, opts.shards)
        .into_iter()
        .map(|shard| {
            let mut shard: Vec<RandomTensor> = shard
                .into_iter()
                .map(|tensor| RandomTensor {
                    tensor,
                    dtype,
                    seed: opts.seed,
                })
                .collect();
            // The layout of the checkpoints made before, with the safetensors crate's writer.
            safetensors_order(&mut shard);
            shard
        })
        .collect();
    writer.write_shards(shards, |t| {
        Ok::<_, HfWriteError>(random_values(&t.tensor, t.dtype, t.seed))
    })?;

    writer.write_config(&config_text)?;
    let mut generation = json!({ "_from_model_config": true });
    if let Some(bos) = config.bos_token_id {
        generation["bos_token_id"] = json!(bos);
    }
    match config.eos_token_ids.as_slice() {
        [] => {}
        [one] => generation["eos_token_id"] = json!(one),
        many => generation["eos_token_id"] = json!(many),
    }
    writer.write_json("generation_config.json", &generation)?;
    if let Some(tokenizer) = &opts.tokenizer {
        writer.copy_file("tokenizer.json", tokenizer)?;
    }
    Ok(())
}

/// Splits tensors, in order, into `count` runs of roughly equal byte size.
fn split_into_shards(
    tensors: &[ExpectedTensor],
    dtype: SourceDtype,
    count: usize,
) -> Vec<Vec<ExpectedTensor>> {
    let bytes = |t: &ExpectedTensor| t.shape.iter().product::<usize>() * dtype.size();
    let total: usize = tensors.iter().map(bytes).sum();
    let mut shards = vec![Vec::new(); count];
    let mut cumulative = 0usize;
    let mut current = 0usize;
    for (i, tensor) in tensors.iter().enumerate() {
        let remaining = tensors.len() - i;
        let by_size = cumulative * count / total.max(1);
        // Advance one shard at a time (none is skipped), and early enough that every later
        // shard still gets a tensor.
        if i > 0 && current + 1 < count && (by_size > current || remaining < count - current) {
            current += 1;
        }
        shards[current].push(tensor.clone());
        cumulative += bytes(tensor);
    }
    shards
}

/// A tensor whose bytes are generated only when the checkpoint writer asks for them.
struct RandomTensor {
    tensor: ExpectedTensor,
    dtype: SourceDtype,
    seed: u64,
}

impl ShardTensor for RandomTensor {
    fn name(&self) -> &str {
        &self.tensor.name
    }

    fn dtype(&self) -> SourceDtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }
}

/// The little-endian bytes of one tensor's deterministic random values.
fn random_values(tensor: &ExpectedTensor, dtype: SourceDtype, seed: u64) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(b"marengo-synth\0");
    hasher.update(seed.to_le_bytes());
    hasher.update(tensor.name.as_bytes());
    let mut rng = ChaCha8Rng::from_seed(hasher.finalize().into());

    let count: usize = tensor.shape.iter().product();
    let (scale, offset) = match tensor.role {
        Role::Embedding => (0.5f32, 0.0f32),
        Role::Norm => (0.1, 1.0),
        Role::Bias => (0.5, 0.0),
        Role::Linear => {
            let in_features = tensor.shape.last().copied().unwrap_or(1) as f32;
            (1.0 / in_features.sqrt(), 0.0)
        }
    };
    let mut out = Vec::with_capacity(count * dtype.size());
    for _ in 0..count {
        let unit = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
        let value = (2.0 * unit - 1.0) * scale + offset;
        match dtype {
            SourceDtype::Bf16 => out.extend_from_slice(&bf16::from_f32(value).to_le_bytes()),
            SourceDtype::F16 => out.extend_from_slice(&f16::from_f32(value).to_le_bytes()),
            SourceDtype::F32 => out.extend_from_slice(&value.to_le_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: Vec<usize>, role: Role) -> ExpectedTensor {
        ExpectedTensor {
            name: name.into(),
            shape,
            role,
        }
    }

    #[test]
    fn values_depend_on_seed_and_name_only() {
        let a = tensor("a", vec![4, 8], Role::Linear);
        let b = tensor("b", vec![4, 8], Role::Linear);
        let first = random_values(&a, SourceDtype::F32, 7);
        assert_eq!(first, random_values(&a, SourceDtype::F32, 7));
        assert_ne!(first, random_values(&b, SourceDtype::F32, 7));
        assert_ne!(first, random_values(&a, SourceDtype::F32, 8));
    }

    #[test]
    fn values_stay_in_their_role_range() {
        let cases = [
            (tensor("l", vec![16, 64], Role::Linear), -0.125f32, 0.125f32),
            (tensor("n", vec![256], Role::Norm), 0.9, 1.1),
            (tensor("e", vec![32, 8], Role::Embedding), -0.5, 0.5),
        ];
        for (t, lo, hi) in cases {
            let bytes = random_values(&t, SourceDtype::F32, 1);
            let mut values = vec![0f32; bytes.len() / 4];
            SourceDtype::F32.widen_into(&bytes, &mut values);
            assert!(values.iter().all(|v| (lo..=hi).contains(v)), "{}", t.name);
            let mean = values.iter().sum::<f32>() / values.len() as f32;
            assert!(
                (mean - (lo + hi) / 2.0).abs() < (hi - lo) * 0.1,
                "{}",
                t.name
            );
        }
    }

    #[test]
    fn shards_are_contiguous_non_empty_and_balanced() {
        let tensors: Vec<_> = (0..10)
            .map(|i| tensor(&format!("t{i}"), vec![100], Role::Norm))
            .collect();
        for count in 1..=10 {
            let shards = split_into_shards(&tensors, SourceDtype::F32, count);
            assert_eq!(shards.len(), count);
            assert!(shards.iter().all(|s| !s.is_empty()), "{count} shards");
            let flat: Vec<_> = shards.concat();
            assert_eq!(flat, tensors);
        }
        let shards = split_into_shards(&tensors, SourceDtype::F32, 2);
        assert_eq!(shards[0].len(), 5);
    }
}
