//! Each example client's `json_schema` call (`--json-schema`: a sentiment label as a JSON
//! object) gets an answer that parses as JSON and has the schema's one key, from the real
//! service on a private bus. Needs the `json_schema` option (structured output, issue #16).

use std::process::Output;

use marengo_testkit::dbus::{Bus, Daemon};
use marengo_testkit::example_clients::Client;
use marengo_testkit::scratch_dir;

#[test]
fn example_clients_get_json_that_parses() {
    let dir = scratch_dir("example_clients_json");
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(&dir, &bus.address, &[]);
    for client in Client::ALL {
        let Output {
            status,
            stdout,
            stderr,
        } = client
            .command()
            .args([
                "--address",
                &bus.address,
                "--max-tokens",
                "64",
                "--json-schema",
            ])
            .arg("The film was wonderful.")
            .output()
            .unwrap_or_else(|e| panic!("starting the {client} client: {e}"));
        let (stdout, stderr) = (
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr),
        );
        assert!(status.success(), "{client}: {status}\n{stderr}");
        assert!(
            stderr.lines().any(|line| line == "finished: stop"),
            "{client}: the object did not end by itself\n{stderr}"
        );
        let answer: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{client}: {stdout:?} is not JSON: {e}"));
        let sentiment = answer["sentiment"].as_str().unwrap_or_default();
        assert!(
            ["positive", "negative", "neutral"].contains(&sentiment),
            "{client}: {answer}"
        );
    }
}
