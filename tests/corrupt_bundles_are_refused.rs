//! Fuzzing the bundle loader: a bundle whose manifest, graph, weights or tokenizer was damaged
//! (bytes flipped, a number replaced, a file cut short or grown, with or without the manifest's
//! size following it) is refused with an error, at load or with a typed error when it runs, or,
//! when the damage leaves a consistent bundle, loads and generates; it never panics. The sizes are what `Engine::load` checks without
//! hashing, so a damaged file whose size the manifest still matches is the parsers' case.
//!
//! Deterministic in CI (fixed seed); `PROPTEST_CASES=N` and `PROPTEST_RNG_SEED=S` run a longer
//! or another session by hand.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use marengo::engine::{Engine, EngineError, EngineOptions};
use marengo::sequence::SequenceError;
use marengo_testkit::{Kind, tiny_bundle};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};

const FILES: [&str; 4] = [
    "bundle.json",
    "model.onnx",
    "model.weights",
    "tokenizer.json",
];

/// What is done to one file of the bundle.
#[derive(Debug, Clone)]
enum Damage {
    /// XOR bytes at these positions (fractions of the file's length) with these values.
    Flip(Vec<(prop::sample::Index, u8)>),
    /// Cut the file at this fraction of its length.
    Truncate(prop::sample::Index),
    /// Append these bytes.
    Grow(Vec<u8>),
    /// Replace one number of the manifest (chosen among them all) with this value.
    Number(prop::sample::Index, serde_json::Value),
}

fn nasty_number() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::json!(0)),
        Just(serde_json::json!(1)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(u64::MAX)),
        Just(serde_json::json!(i64::MIN)),
        Just(serde_json::json!(1u64 << 32)),
        Just(serde_json::json!(1e300)),
        Just(serde_json::json!(0.5)),
        (0u64..100_000).prop_map(|n| serde_json::json!(n)),
    ]
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..8).prop_map(Damage::Flip),
        1 => any::<prop::sample::Index>().prop_map(Damage::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Grow),
        2 => (any::<prop::sample::Index>(), nasty_number()).prop_map(|(i, v)| Damage::Number(i, v)),
    ]
}

/// Where the flips land in model.onnx: its header and the graph's structure come first, and
/// the tail is mostly names, so half the flips aim at the first 2 KiB.
fn flip_position(file: &str, len: usize, at: &prop::sample::Index, salt: usize) -> usize {
    if file == "model.onnx" && salt.is_multiple_of(2) {
        at.index(len.min(2048))
    } else {
        at.index(len)
    }
}

/// Every number in a JSON document, as mutable references in document order.
fn numbers(value: &mut serde_json::Value) -> Vec<&mut serde_json::Value> {
    match value {
        serde_json::Value::Number(_) => vec![value],
        serde_json::Value::Array(items) => items.iter_mut().flat_map(numbers).collect(),
        serde_json::Value::Object(map) => map.values_mut().flat_map(numbers).collect(),
        _ => Vec::new(),
    }
}

/// Copies the bundle to `dir` with `damage` done to `file` (hard links for the others), and,
/// when `follow_size`, the manifest's size of `file` set to its new length.
fn damaged_copy(original: &Path, dir: &Path, file: &str, damage: &Damage, follow_size: bool) {
    for name in FILES {
        if name != file && name != "bundle.json" {
            std::fs::hard_link(original.join(name), dir.join(name)).expect("hard link");
        }
    }
    let mut bytes = std::fs::read(original.join(file)).expect("bundle file");
    let number_in_manifest = matches!(damage, Damage::Number(..));
    match damage {
        Damage::Flip(flips) => {
            let len = bytes.len();
            for (salt, (at, value)) in flips.iter().enumerate() {
                bytes[flip_position(file, len, at, salt)] ^= value;
            }
        }
        Damage::Truncate(at) => bytes.truncate(at.index(bytes.len())),
        Damage::Grow(tail) => bytes.extend_from_slice(tail),
        Damage::Number(..) => {}
    }
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(original.join("bundle.json")).expect("bundle.json"))
            .expect("the original manifest is JSON");
    if let Damage::Number(at, value) = damage {
        let mut all = numbers(&mut manifest);
        let len = all.len();
        *all[at.index(len)] = value.clone();
    }
    if follow_size && file != "bundle.json" {
        manifest["files"][file]["size"] = serde_json::json!(bytes.len());
    }
    if file == "bundle.json" && !number_in_manifest {
        std::fs::write(dir.join("bundle.json"), &bytes).expect("write");
    } else {
        std::fs::write(dir.join("bundle.json"), manifest.to_string()).expect("write");
        if file != "bundle.json" {
            std::fs::write(dir.join(file), &bytes).expect("write");
        }
    }
}

/// Bundles that loaded and generated.
static LOADED: AtomicUsize = AtomicUsize::new(0);
/// Bundles that `Engine::load` refused.
static REFUSED: AtomicUsize = AtomicUsize::new(0);
/// Bundles that loaded but whose session or generation then failed with a typed error.
static REFUSED_AFTER_LOAD: AtomicUsize = AtomicUsize::new(0);

/// Why a bundle that loaded could not generate.
#[derive(Debug, thiserror::Error)]
enum AfterLoad {
    #[error("opening a session: {0}")]
    Session(#[from] EngineError),
    #[error("generating: {0}")]
    Generate(#[from] SequenceError),
}

/// Loads the damaged bundle and, when that works, generates a few tokens, which must not panic
/// either (a consistent bundle with wrong numbers in it may well generate nonsense). A bundle
/// counts as loaded only once it has generated.
fn load_and_generate(dir: &Path) {
    match Engine::load(dir, &EngineOptions::default()) {
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an error without a message");
            REFUSED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(engine) => match generate(&engine) {
            Ok(()) => {
                LOADED.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                assert!(!e.to_string().is_empty(), "an error without a message");
                REFUSED_AFTER_LOAD.fetch_add(1, Ordering::Relaxed);
            }
        },
    }
}

/// A prompt and two greedy tokens.
fn generate(engine: &Engine) -> Result<(), AfterLoad> {
    let mut session = engine.new_sequence()?;
    let mut logits = session.feed(&[1, 415, 2936])?;
    for _ in 0..2 {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        logits = session.feed(&[next])?;
    }
    Ok(())
}

fn config() -> Config {
    fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }
    Config {
        cases: env("PROPTEST_CASES").unwrap_or(160),
        rng_seed: RngSeed::Fixed(env("PROPTEST_RNG_SEED").unwrap_or(0x6d61_7265)),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs the cases by hand rather than through `proptest!`, to count the outcomes after.
#[test]
fn damaged_bundles_are_refused_or_work_never_panic() {
    let original = tiny_bundle(Kind::Fp8);
    let strategy = (prop::sample::select(&FILES[..]), damage(), any::<bool>());
    let mut runner = TestRunner::new(config());
    let result = runner.run(&strategy, |(file, damage, follow_size)| {
        let scratch = tempfile::tempdir().expect("scratch dir");
        damaged_copy(original, scratch.path(), file, &damage, follow_size);
        load_and_generate(scratch.path());
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    let (loaded, refused, refused_after_load) = (
        LOADED.load(Ordering::Relaxed),
        REFUSED.load(Ordering::Relaxed),
        REFUSED_AFTER_LOAD.load(Ordering::Relaxed),
    );
    println!(
        "damaged bundles: {refused} refused, {refused_after_load} refused after loading, \
         {loaded} loaded and generated"
    );
    assert!(
        loaded > 0 && refused > 0,
        "the damage reached one outcome only"
    );
}

/// The fuzzing above must reach both outcomes, or it tests less than it claims: the undamaged
/// bundle loads, and a damaged size is refused.
#[test]
fn the_undamaged_bundle_loads_and_a_wrong_size_is_refused() {
    let original = tiny_bundle(Kind::Fp8);
    let scratch = tempfile::tempdir().expect("scratch dir");
    damaged_copy(
        original,
        scratch.path(),
        "model.onnx",
        &Damage::Grow(Vec::new()),
        false,
    );
    Engine::load(scratch.path(), &EngineOptions::default()).expect("the copy loads");

    let scratch = tempfile::tempdir().expect("scratch dir");
    damaged_copy(
        original,
        scratch.path(),
        "model.weights",
        &Damage::Grow(vec![0; 4]),
        false,
    );
    let err = Engine::load(scratch.path(), &EngineOptions::default())
        .err()
        .expect("a grown weights file is refused");
    assert!(err.to_string().contains("model.weights"), "{err}");
}

/// The FP8 weights are bound from the tensor table `Bundle::open` checked, so a graph whose
/// initializer points at other bytes of `model.weights` than the table says (here k_proj's at
/// v_proj's, same shape and length: nothing else would notice) is refused, naming the tensor.
#[test]
fn a_graph_disagreeing_with_the_tensor_table_is_refused() {
    use marengo_bundle::onnx::ModelProto;
    use prost::Message;

    let original = tiny_bundle(Kind::Fp8);
    let scratch = tempfile::tempdir().expect("scratch dir");
    let bytes = std::fs::read(original.join("model.onnx")).expect("model.onnx");
    let mut model = ModelProto::decode(bytes.as_slice()).expect("the exported graph decodes");
    let graph = model.graph.as_mut().expect("a graph");
    let offset_of = |name: &str| {
        let init = graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no initializer {name}"));
        init.external_location()
            .expect("external data")
            .expect("stored outside the graph")
            .offset
    };
    let k = "model.layers.0.self_attn.k_proj.weight";
    let v_offset = offset_of("model.layers.0.self_attn.v_proj.weight");
    let init = graph
        .initializer
        .iter_mut()
        .find(|t| t.name == k)
        .expect("k_proj");
    let entry = init
        .external_data
        .iter_mut()
        .find(|e| e.key == "offset")
        .expect("an offset");
    entry.value = v_offset.to_string();
    let damaged = model.encode_to_vec();

    for name in ["model.weights", "tokenizer.json"] {
        std::fs::hard_link(original.join(name), scratch.path().join(name)).expect("hard link");
    }
    std::fs::write(scratch.path().join("model.onnx"), &damaged).expect("write");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(original.join("bundle.json")).expect("bundle.json"))
            .expect("the manifest is JSON");
    manifest["files"]["model.onnx"]["size"] = serde_json::json!(damaged.len());
    std::fs::write(scratch.path().join("bundle.json"), manifest.to_string()).expect("write");

    let err = Engine::load(scratch.path(), &EngineOptions::default())
        .err()
        .expect("a graph pointing elsewhere than the table is refused")
        .to_string();
    assert!(
        err.contains(k) && err.contains("offset") && err.contains("tensor table"),
        "{err}"
    );
}
