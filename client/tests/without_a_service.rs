//! marengoctl's answers when there is nothing to talk to: scripts branch on its exit codes.
//! (Being an integration test of this package, it also makes `cargo test --workspace` build
//! the `marengoctl` program, which the daemon's D-Bus tests run.)

use std::process::Command;

fn marengoctl(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_marengoctl"))
        .args(args)
        .output()
        .expect("marengoctl runs");
    let code = output.status.code().expect("marengoctl exits, not killed");
    (code, String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn an_unreachable_bus_exits_3_and_says_so() {
    let dir = std::env::temp_dir().join(format!("marengoctl-no-bus-{}", std::process::id()));
    let address = format!("unix:path={}/bus", dir.display());
    for command in [&["status"][..], &["generate", "Once upon a time"][..]] {
        let mut args = vec!["--address", address.as_str()];
        args.extend_from_slice(command);
        let (code, stderr) = marengoctl(&args);
        assert_eq!(code, 3, "{command:?}: {stderr}");
        assert!(
            stderr.contains("cannot reach org.marengo.Llm1") && stderr.contains(&address),
            "{command:?}: {stderr}"
        );
    }
}

#[test]
fn a_bad_command_line_exits_2_before_any_bus() {
    let (code, stderr) = marengoctl(&["--frobnicate", "status"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--frobnicate"), "{stderr}");
    let (code, stderr) = marengoctl(&["generate", "--max-tokens", "many", "hi"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("many"), "{stderr}");
}
