//! A daemon over a models directory: it starts with none installed and says so (`State`
//! `no-model`, `NoModel` with how to install one, marengoctl's hints), lists what
//! `marengo-export convert --install` puts there without a restart — never an install that was
//! killed half way — and serves each request with the model it names, one resident at a time.

use std::collections::HashMap;
use std::process::{Command, Output};

use marengo_client::Llm1Error;
use marengo_testkit::dbus::{Bus, Daemon, connect, greedy, proxy};
use marengo_testkit::{Kind, binaries, scratch_dir, tiny_bundle};
use zbus::Variant;

fn marengoctl(address: &str, args: &[&str]) -> Output {
    Command::new(binaries::marengoctl())
        .args(["--address", address])
        .args(args)
        .output()
        .expect("running marengoctl")
}

fn install(checkpoint: &std::path::Path, models: &std::path::Path, name: &str, extra: &[&str]) {
    let output = Command::new(binaries::marengo_export())
        .arg("convert")
        .arg(checkpoint)
        .args(["--install", name, "--models-dir"])
        .arg(models)
        .args(extra)
        .output()
        .expect("running marengo-export");
    assert!(
        output.status.success(),
        "installing {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_model_then_installed_models_chosen_per_request() {
    let dir = scratch_dir("models_are_found_and_chosen");
    let models = dir.join("models");
    std::fs::create_dir(&models).expect("creating the models directory");
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start_with_models(&dir, &bus.address, &models, &[]);
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;

    // Nothing installed: the daemon answers, and generation says how to install a model.
    assert_eq!(llm.state().await.expect("State"), "no-model");
    assert_eq!(llm.model().await.expect("Model"), "");
    assert!(llm.models().await.expect("Models").is_empty());
    match llm.complete("Hello", greedy(4)).await {
        Err(Llm1Error::NoModel(message)) => assert!(
            message.contains("--install") && message.contains(&models.display().to_string()),
            "{message}"
        ),
        other => panic!("expected NoModel, got {other:?}"),
    }
    let refused = marengoctl(&bus.address, &["generate", "Hello"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(8), "{stderr}");
    assert!(
        stderr.contains("hint:") && stderr.contains("models"),
        "{stderr}"
    );
    // No daemon on the system bus: exit 3 and what to look at.
    let unreachable = Command::new(binaries::marengoctl())
        .args(["generate", "Hello"])
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            format!("unix:path={}", dir.join("no-bus").display()),
        )
        .output()
        .expect("running marengoctl");
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert_eq!(unreachable.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("journalctl -u marengod") && stderr.contains("group `marengo`"),
        "{stderr}"
    );

    // An install killed half way (the file size limit stops it inside model.weights) leaves
    // its hidden staging directory, and no model.
    let checkpoint = tiny_bundle(Kind::Fp8)
        .parent()
        .expect("the tiny bundle's directory")
        .join("checkpoint");
    let killed = Command::new("prlimit")
        .arg("--fsize=1000000")
        .arg(binaries::marengo_export())
        .arg("convert")
        .arg(&checkpoint)
        .args(["--install", "broken", "--models-dir"])
        .arg(&models)
        .output()
        .expect("running prlimit marengo-export");
    assert!(!killed.status.success(), "the limited export finished");
    let staged: Vec<String> = std::fs::read_dir(&models)
        .expect("listing the models directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(
        staged.len() == 1 && staged[0].starts_with(".broken.partial-"),
        "{staged:?}"
    );
    assert!(llm.models().await.expect("Models").is_empty());
    assert_eq!(llm.state().await.expect("State"), "no-model");

    // Two models installed while the daemon runs; the first by name is the default.
    install(&checkpoint, &models, "alpha", &[]);
    install(
        &checkpoint,
        &models,
        "beta",
        &Kind::F32
            .convert_args()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let listed = llm.models().await.expect("Models");
    let names: Vec<&str> = listed.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"], "{listed:?}");
    assert_eq!(listed[0].1, "fp8_e4m3fn");
    assert_eq!(listed[1].1, "f32");
    assert!(listed.iter().all(|m| m.2 > 0 && m.3 > 0), "{listed:?}");
    assert_eq!(llm.model().await.expect("Model"), "alpha");
    assert_eq!(llm.state().await.expect("State"), "unloaded");

    // Each request runs on the model it names; the other is unloaded first.
    let model_of = |stats: &HashMap<String, zbus::OwnedVariant>| -> String {
        let value: &Variant<'_> = &stats["model"];
        String::try_from(value.clone()).expect("model is a string")
    };
    let mut beta = greedy(4);
    beta.insert("model", Variant::from("beta"));
    let (_, stats) = llm.complete("Hello", beta).await.expect("Complete on beta");
    assert_eq!(model_of(&stats), "beta");
    assert_eq!(llm.loaded_model().await.expect("LoadedModel"), "beta");
    let (_, stats) = llm.complete("Hello", greedy(4)).await.expect("Complete");
    assert_eq!(model_of(&stats), "alpha");
    assert_eq!(llm.loaded_model().await.expect("LoadedModel"), "alpha");
    assert_eq!(llm.state().await.expect("State"), "idle");
    assert!(
        daemon
            .log_text()
            .contains("unloading the model for another"),
        "{}",
        daemon.log_text()
    );
    // tract's operator-set warning is not shown at each load.
    assert!(
        !daemon.log_text().contains("only tested against"),
        "{}",
        daemon.log_text()
    );
    let mut unknown = greedy(4);
    unknown.insert("model", Variant::from("gamma"));
    match llm.complete("Hello", unknown).await {
        Err(Llm1Error::InvalidOption(message)) => {
            assert!(
                message.contains("`model`") && message.contains("alpha, beta"),
                "{message}"
            )
        }
        other => panic!("expected InvalidOption, got {other:?}"),
    }

    // `marengoctl models`: both, the default and loaded one marked, not the broken install.
    let listing = marengoctl(&bus.address, &["models"]);
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 3, "{listing}");
    assert!(
        lines[1].starts_with("alpha") && lines[1].ends_with("default, loaded"),
        "{listing}"
    );
    assert!(
        lines[2].starts_with("beta") && !lines[2].contains("loaded"),
        "{listing}"
    );
    assert!(!listing.contains("broken"), "{listing}");
}
