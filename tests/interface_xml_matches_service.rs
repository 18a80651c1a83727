//! The committed `packaging/dbus/org.marengo.Llm1.xml` is the interface the running service
//! exports: what clients code against cannot drift from what they get. Its documentation is
//! `org.gtk.GDBus.DocString` annotations, which generators read (XML comments they drop): the
//! service exports none, so the comparison leaves them out, and `gdbus-codegen` is run on the
//! file to check that they reach its output, every error name included.

use std::process::Command;

use marengo_client::Llm1Error;
use marengo_testkit::dbus::{Bus, Daemon};
use marengo_testkit::{run, scratch_dir};

const DOC_STRING: &str = r#"<annotation name="org.gtk.GDBus.DocString""#;

fn committed_xml() -> String {
    let path = marengo_testkit::repo_root().join("packaging/dbus/org.marengo.Llm1.xml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` without the spans from each `start` to the next `end` (included).
fn without(text: &str, start: &str, end: &str) -> String {
    let mut kept = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(start) {
        kept.push_str(&rest[..at]);
        let close = rest[at..]
            .find(end)
            .unwrap_or_else(|| panic!("{start} is not closed by {end}"));
        rest = &rest[at + close + end.len()..];
    }
    kept.push_str(rest);
    kept
}

/// The `<interface name="org.marengo.Llm1">` element of an introspection document, without
/// comments and documentation, one trimmed line per element (an `<arg>` left without children
/// written as the empty element the service writes).
fn llm1_interface(xml: &str) -> Vec<String> {
    let start = xml
        .find(r#"<interface name="org.marengo.Llm1">"#)
        .unwrap_or_else(|| panic!("no org.marengo.Llm1 interface in:\n{xml}"));
    let end = start
        + xml[start..]
            .find("</interface>")
            .expect("the interface element is closed")
        + "</interface>".len();
    let bare = without(&without(&xml[start..end], "<!--", "-->"), DOC_STRING, "/>");
    let bare = without(
        &bare,
        r#"<annotation name="org.gtk.GDBus.DocString.Short"#,
        "/>",
    );
    let mut lines: Vec<String> = Vec::new();
    for line in bare.lines().map(str::trim).filter(|line| !line.is_empty()) {
        if line == "</arg>"
            && let Some(open) = lines.last_mut()
            && open.starts_with("<arg ")
            && !open.ends_with("/>")
        {
            open.truncate(open.len() - 1);
            open.push_str("/>");
            continue;
        }
        lines.push(line.to_owned());
    }
    lines
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
    assert_eq!(
        llm1_interface(&committed_xml()),
        llm1_interface(&exported),
        "packaging/dbus/org.marengo.Llm1.xml differs from the service's introspection:\n{exported}"
    );
}

/// Every error the service can answer, named by the client crate. The match fails to compile
/// when a variant is added, so that its name gets documented too.
fn every_error_name() -> Vec<String> {
    let errors = [
        Llm1Error::InvalidOption(String::new()),
        Llm1Error::InvalidArgument(String::new()),
        Llm1Error::ContextOverflow(String::new()),
        Llm1Error::Busy(String::new()),
        Llm1Error::NotFound(String::new()),
        Llm1Error::AccessDenied(String::new()),
        Llm1Error::NoModel(String::new()),
        Llm1Error::Internal(String::new()),
    ];
    for error in &errors {
        match error {
            Llm1Error::ZBus(_)
            | Llm1Error::InvalidOption(_)
            | Llm1Error::InvalidArgument(_)
            | Llm1Error::ContextOverflow(_)
            | Llm1Error::Busy(_)
            | Llm1Error::NotFound(_)
            | Llm1Error::AccessDenied(_)
            | Llm1Error::NoModel(_)
            | Llm1Error::Internal(_) => {}
        }
    }
    errors
        .iter()
        .map(|error| zbus::DBusError::name(error).to_string())
        .collect()
}

/// The text of every `org.gtk.GDBus.DocString` annotation, whitespace collapsed.
fn doc_strings(xml: &str) -> Vec<String> {
    xml.split(DOC_STRING)
        .skip(1)
        .map(|rest| {
            let value = rest
                .split_once(r#"value=""#)
                .and_then(|(_, value)| value.split_once('"'))
                .map(|(value, _)| value)
                .expect("a DocString annotation has a value");
            value.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect()
}

#[test]
fn gdbus_codegen_carries_the_documentation_and_the_error_names() {
    let committed = committed_xml();
    let docs = doc_strings(&committed);
    // The interface, 6 methods, 2 signals, 6 properties and every argument are documented.
    let elements = ["<interface ", "<method ", "<signal ", "<property ", "<arg "]
        .iter()
        .map(|element| committed.matches(element).count())
        .sum::<usize>();
    assert_eq!(docs.len(), elements, "an element has no DocString");

    let dir = scratch_dir("interface_docbook");
    run(Command::new("gdbus-codegen")
        .args(["--generate-docbook", "doc", "--output-directory"])
        .arg(&dir)
        .arg(marengo_testkit::repo_root().join("packaging/dbus/org.marengo.Llm1.xml")));
    let docbook_path = dir.join("doc-org.marengo.Llm1.xml");
    let docbook = std::fs::read_to_string(&docbook_path)
        .unwrap_or_else(|e| panic!("{}: {e}", docbook_path.display()));
    let docbook_text = docbook.split_whitespace().collect::<Vec<_>>().join(" ");
    for doc in &docs {
        // gdbus-codegen marks up @arg references and quotes; a plain stretch must be there.
        let plain: String = doc.split(['@', '\'']).next().unwrap_or(doc).to_owned();
        let plain = plain.trim();
        assert!(
            docbook_text.contains(plain),
            "{plain:?} is not in the docbook output {}",
            docbook_path.display()
        );
    }
    for name in every_error_name() {
        assert!(
            docbook_text.contains(&name),
            "{name} is documented for no method"
        );
    }
}
