//! The example clients of `examples/clients/` (Python with Gio, GJS, C from gdbus-codegen)
//! work against the real service on a private bus: a chat answer streams to stdout, and
//! Ctrl-C mid-stream makes them call `Cancel`, after which the service ends the request as
//! `cancelled` and they exit. One daemon serves the three.

use std::io::Read;
use std::process::{Child, Output, Stdio};

use marengo_testkit::dbus::{Bus, Daemon};
use marengo_testkit::example_clients::Client;
use marengo_testkit::scratch_dir;

/// Lines of the daemon's log for finished requests with this reason.
fn finished_with(daemon: &Daemon, reason: &str) -> usize {
    daemon
        .log_text()
        .lines()
        .filter(|line| {
            line.contains("request finished") && line.contains(&format!("reason={reason}"))
        })
        .count()
}

fn spawn(client: Client, address: &str, max_tokens: u32, prompt: &str) -> Child {
    client
        .command()
        .args([
            "--address",
            address,
            "--max-tokens",
            &max_tokens.to_string(),
            prompt,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting the {client} client: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn streams_an_answer(client: Client, address: &str, daemon: &Daemon) {
    let before = finished_with(daemon, "length") + finished_with(daemon, "stop");
    let Output {
        status,
        stdout,
        stderr,
    } = spawn(client, address, 8, "Say hello.")
        .wait_with_output()
        .expect("waiting for the client");
    let (stdout, stderr) = (text(&stdout), text(&stderr));
    assert!(status.success(), "{client}: {status}\n{stderr}");
    let reason = stderr
        .lines()
        .find_map(|line| line.strip_prefix("finished: "))
        .unwrap_or_else(|| panic!("{client} printed no end:\n{stderr}"));
    assert!(reason == "length" || reason == "stop", "{client}: {stderr}");
    assert!(
        reason == "stop" || !stdout.trim().is_empty(),
        "{client}: eight tokens and no text"
    );
    assert_eq!(
        finished_with(daemon, "length") + finished_with(daemon, "stop"),
        before + 1,
        "{client}: the service did not end one request\n{}",
        daemon.log_text()
    );
}

fn cancels_on_ctrl_c(client: Client, address: &str, daemon: &Daemon) {
    let before = finished_with(daemon, "cancelled");
    let mut child = spawn(client, address, 4000, "Tell me a very long story.");
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .expect("piped stdout")
        .read_exact(&mut first)
        .unwrap_or_else(|e| panic!("{client} streams no text: {e}"));
    let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
    // SAFETY: kill(2) on our own child's pid, which is not reaped before wait below.
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGINT) },
        0,
        "sending SIGINT"
    );
    let Output { status, stderr, .. } = child.wait_with_output().expect("waiting for the client");
    let stderr = text(&stderr);
    assert!(
        stderr.lines().any(|line| line == "finished: cancelled"),
        "{client} did not see its request cancelled ({status}):\n{stderr}"
    );
    assert_eq!(status.code(), Some(130), "{client}: {stderr}");
    assert_eq!(
        finished_with(daemon, "cancelled"),
        before + 1,
        "{client}: the service did not cancel\n{}",
        daemon.log_text()
    );
}

#[test]
fn example_clients_stream_a_chat_and_cancel_on_ctrl_c() {
    let dir = scratch_dir("example_clients");
    let bus = Bus::session_like(&dir);
    let daemon = Daemon::start(&dir, &bus.address, &[]);
    for client in Client::ALL {
        streams_an_answer(client, &bus.address, &daemon);
        cancels_on_ctrl_c(client, &bus.address, &daemon);
    }
}
