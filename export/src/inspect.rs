//! `marengo-export inspect`: the manifest and tensor table of a bundle, human-readable, after
//! the same checks the daemon makes; `--verify` adds the full SHA-256 pass.

use std::io::Write;
use std::path::Path;

use marengo_bundle::{Bundle, BundleError};

/// Why a bundle could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Prints `dir`'s manifest to `out`; verifies every file's hash when `verify`.
pub fn inspect(dir: &Path, verify: bool, out: &mut dyn Write) -> Result<(), InspectError> {
    let bundle = Bundle::open(dir)?;
    let m = bundle.manifest();
    let a = &m.architecture;
    writeln!(out, "bundle        {}", dir.display())?;
    writeln!(out, "format        {} v{}", m.format, m.format_version)?;
    writeln!(
        out,
        "architecture  {}: hidden {}, {} layers, {} heads ({} kv, head_dim {}), mlp {}, vocab {}",
        a.family,
        a.hidden_size,
        a.num_layers,
        a.num_heads,
        a.num_kv_heads,
        a.head_dim,
        a.intermediate_size,
        a.vocab_size
    )?;
    writeln!(
        out,
        "              rope_theta {}, rms_norm_eps {}, tied embeddings {}, context {} (at most {}){}",
        a.rope_theta,
        a.rms_norm_eps,
        a.tie_word_embeddings,
        a.context_length,
        a.max_context(),
        a.sliding_window
            .map(|w| format!(", sliding window {w}"))
            .unwrap_or_default()
    )?;
    if let Some(scaling) = &a.rope_scaling {
        writeln!(out, "              rope scaling {scaling:?}")?;
    }
    let block = m
        .quantization
        .block_size
        .map(|b| format!(", block {b}"))
        .unwrap_or_default();
    writeln!(out, "quantization  {:?}{block}", m.quantization.kind)?;
    let t = &m.special_tokens;
    writeln!(
        out,
        "special       bos {:?}, eos {:?}, pad {:?}, unk {:?}",
        t.bos, t.eos, t.pad, t.unk
    )?;
    let template = m.chat_template.as_deref().map_or("none".to_owned(), |s| {
        format!("{} chars", s.chars().count())
    });
    writeln!(out, "chat template {template}")?;
    let p = &m.provenance;
    writeln!(
        out,
        "exported by   marengo-export {} at {} (unix), command: {}",
        p.exporter_version,
        p.created,
        p.command_line.join(" ")
    )?;
    for s in &p.sources {
        writeln!(
            out,
            "source        {} {} bytes sha256 {}",
            s.path, s.size, s.sha256
        )?;
    }
    for (name, f) in &m.files {
        writeln!(
            out,
            "file          {name} {} bytes sha256 {}",
            f.size, f.sha256
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<48} {:<10} {:<14} {:>12} {:>12} {:>10}",
        "tensor", "dtype", "shape", "offset", "bytes", "rel err"
    )?;
    for t in &m.tensors {
        let shape = format!("{:?}", t.shape);
        let err = t
            .rel_rms_error
            .map(|e| format!("{e:.3e}"))
            .unwrap_or_default();
        writeln!(
            out,
            "{:<48} {:<10} {:<14} {:>12} {:>12} {:>10}",
            t.name,
            format!("{:?}", t.dtype),
            shape,
            t.offset,
            t.length,
            err
        )?;
    }
    if verify {
        bundle.verify_hashes()?;
        writeln!(out, "\nsha256 of every file verified")?;
    }
    Ok(())
}
