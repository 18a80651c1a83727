//! The `Capabilities` property describes the running service truthfully: every option it
//! lists is accepted with its example, one it does not list is refused, its defaults are
//! those of every entry point, its limits are the daemon's, and shell clients can read it.

use std::collections::HashMap;
use std::process::Command;

use marengo::dbus::{Llm1Error, OPTIONS};
use marengo_client::defaults;
use marengo_testkit::dbus::{Bus, Daemon, connect, proxy};
use marengo_testkit::{run, scratch_dir};
use zbus::{OwnedVariant, Variant};

fn dict(value: &OwnedVariant) -> HashMap<String, OwnedVariant> {
    HashMap::try_from(value.try_clone().expect("no fds")).expect("an a{sv}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_list_what_the_service_accepts() {
    let dir = scratch_dir("capabilities");
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(
        &dir,
        &bus.address,
        &[
            "--queue-capacity",
            "5",
            "--parallel",
            "3",
            "--kv-memory-mib",
            "700",
        ],
    );
    let connection = connect(&bus.address).await;
    let llm = proxy(&connection).await;
    let capabilities = llm.capabilities().await.expect("Capabilities");

    let limits = dict(&capabilities["limits"]);
    let limit = |key: &str| u32::try_from(limits[key].clone()).expect("a limit is u");
    let context = llm.context_length().await.expect("ContextLength");
    assert_eq!(limit("context_length"), context);
    assert_eq!(limit("max_tokens"), context - 1);
    assert_eq!(limit("queue_capacity"), 5);
    assert_eq!(limit("max_queued_per_client"), 8);
    assert_eq!(limit("parallel"), 3);
    assert_eq!(limit("kv_memory_mib"), 700);

    let features =
        Vec::<String>::try_from(capabilities["features"].clone()).expect("features is as");
    for feature in ["stream", "cancel", "stop", "seed", "chat"] {
        assert!(features.iter().any(|f| f == feature), "{features:?}");
    }

    let options = dict(&capabilities["options"]);
    assert_eq!(options.len(), OPTIONS.len());
    for (name, described) in &options {
        let described = dict(described);
        let signature = String::try_from(described["type"].clone()).expect("type is s");
        let example = described["example"].try_clone().expect("no fds");
        assert_eq!(example.value_signature().to_string(), signature, "{name}");
        // Accepted as the service describes it.
        let mut sent: HashMap<&str, Variant<'_>> = HashMap::from([("max_tokens", Variant::U32(1))]);
        // A model's example names the packaged model; this daemon's model has its own name.
        let example = match name.as_str() {
            "model" => Variant::from(llm.model().await.expect("Model"))
                .try_to_owned()
                .expect("no fds")
                .into(),
            _ => Variant::from(example),
        };
        sent.insert(name, example);
        llm.complete("Hello", sent)
            .await
            .unwrap_or_else(|e| panic!("{name} with its example refused: {e}"));
    }
    let default = |name: &str| {
        dict(&options[name])
            .get("default")
            .map(|value| value.try_clone().expect("no fds"))
    };
    assert_eq!(
        default("temperature").map(f64::try_from),
        Some(Ok(defaults::TEMPERATURE))
    );
    assert_eq!(
        default("max_tokens").map(u32::try_from),
        Some(Ok(defaults::MAX_TOKENS))
    );
    assert!(
        default("seed").is_none(),
        "a seed is drawn, it has no default"
    );

    let refused = llm
        .complete("Hello", HashMap::from([("colour", Variant::from("blue"))]))
        .await;
    assert!(
        matches!(&refused, Err(Llm1Error::InvalidOption(m)) if m.contains("`colour`")),
        "{refused:?}"
    );

    // What a shell user reads.
    let shown = run(Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(["--json=short", "get-property", "org.marengo.Llm1"])
        .args(["/org/marengo/Llm1", "org.marengo.Llm1", "Capabilities"]));
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("busctl prints JSON");
    assert_eq!(shown["type"], "a{sv}", "{shown}");
    assert_eq!(
        shown["data"]["options"]["data"]["top_k"]["data"]["default"]["data"],
        defaults::TOP_K,
        "{shown}"
    );
}
