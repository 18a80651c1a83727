//! Running a helper program from a test (the exporter, onnxruntime's script, a shell client),
//! shared by the test binaries (included with `#[path]`, since each test is its own crate).

use std::process::Command;

/// Runs `command` to the end and returns its standard output; a program that cannot start,
/// fails or prints invalid UTF-8 fails the test with the command line and its standard error.
#[track_caller]
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap_or_else(|e| panic!("{command:?}: stdout: {e}"))
}
