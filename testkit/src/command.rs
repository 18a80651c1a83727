//! Running a helper program from a test (the exporter, onnxruntime's script, a shell client).

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

/// Runs `command` expecting it to fail and returns its standard error; a program that cannot
/// start or succeeds fails the test.
#[track_caller]
pub fn run_fails(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    assert!(
        !output.status.success(),
        "{command:?} succeeded but should have failed"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}
