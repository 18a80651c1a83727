//! The committed `packaging/dbus/org.marengo.Llm1.xml` is the interface the running service
//! exports: what clients code against cannot drift from what they get.

use std::process::Command;

use marengo_testkit::dbus::{Bus, Daemon};
use marengo_testkit::{run, scratch_dir};

/// The `<interface name="org.marengo.Llm1">` element of an introspection document, with its
/// lines trimmed (indentation differs between the committed file and the service).
fn llm1_interface(xml: &str) -> Vec<String> {
    let start = xml
        .find(r#"<interface name="org.marengo.Llm1">"#)
        .unwrap_or_else(|| panic!("no org.marengo.Llm1 interface in:\n{xml}"));
    let end = start
        + xml[start..]
            .find("</interface>")
            .expect("the interface element is closed")
        + "</interface>".len();
    xml[start..end]
        .lines()
        .map(|line| line.trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect()
}

#[test]
fn committed_xml_equals_the_introspection_of_the_service() {
    let dir = scratch_dir("interface_xml");
    let bus = Bus::session_like(&dir);
    let _daemon = Daemon::start(&dir, &bus.address, &[]);
    let exported = run(Command::new("gdbus")
        .args(["introspect", "--xml", "--address", &bus.address])
        .args([
            "--dest",
            "org.marengo.Llm1",
            "--object-path",
            "/org/marengo/Llm1",
        ]));
    let committed_path = marengo_testkit::repo_root().join("packaging/dbus/org.marengo.Llm1.xml");
    let committed = std::fs::read_to_string(&committed_path)
        .unwrap_or_else(|e| panic!("{}: {e}", committed_path.display()));
    assert_eq!(
        llm1_interface(&committed),
        llm1_interface(&exported),
        "{} differs from the service's introspection:\n{exported}",
        committed_path.display()
    );
}
