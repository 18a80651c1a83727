//! The chat's slash commands: a one-line turn that starts with `/` is one of them, not a
//! message (a message that must start with `/` can be sent as a `"""` block).

use zbus::Variant;

pub const HELP: &str = r#"Commands:
  /set OPTION VALUE  set a request option, as the D-Bus Chat call takes it
                     (e.g. /set temperature 0.7, /set max_tokens 200, /set stop User:);
                     /set alone shows the options set
  /system [TEXT]     start the conversation with this system message; alone, remove it
  /clear             forget the conversation (the system message stays)
  /bye               end the chat (Ctrl-D too)
  /help              this text
A line ending in \ goes on on the next line; """ opens a block of several lines that
the next """ closes. Ctrl-C stops an answer. When the conversation outgrows the model's
context, its oldest exchanges are dropped."#;

#[derive(Debug, PartialEq)]
pub enum Command<'a> {
    Set { key: &'a str, value: &'a str },
    ShowOptions,
    System(Option<&'a str>),
    Clear,
    Bye,
    Help,
}

/// The command `text` names, `None` if it is a message, or what is wrong with it.
pub fn parse(text: &str) -> Option<Result<Command<'_>, String>> {
    let text = text.trim();
    if !text.starts_with('/') || text.contains('\n') {
        return None;
    }
    let (name, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let rest = rest.trim();
    Some(match (name, rest) {
        ("/set", "") => Ok(Command::ShowOptions),
        ("/set", _) => match rest.split_once(char::is_whitespace) {
            Some((key, value)) => Ok(Command::Set {
                key,
                value: value.trim(),
            }),
            None => Err(format!("/set {rest} needs a value: /set OPTION VALUE")),
        },
        ("/system", "") => Ok(Command::System(None)),
        ("/system", _) => Ok(Command::System(Some(rest))),
        ("/clear", "") => Ok(Command::Clear),
        ("/bye", "") => Ok(Command::Bye),
        ("/help" | "/?", "") => Ok(Command::Help),
        ("/clear" | "/bye" | "/help" | "/?", _) => Err(format!("{name} takes no argument")),
        _ => Err(format!("unknown command {name}; /help lists them")),
    })
}

/// The value of `/set KEY VALUE` as the bus carries it. The service accepts any integer type
/// where it wants a number, so numbers go as integers when they are whole and as doubles
/// otherwise, and it is the service that says when the kind does not suit the key. `stop`
/// takes a list: VALUE is its one string.
pub fn option_value(key: &str, value: &str) -> Variant<'static> {
    if key == "stop" {
        return Variant::from(vec![value.to_owned()]);
    }
    if let Ok(n) = value.parse::<u64>() {
        Variant::U64(n)
    } else if let Ok(n) = value.parse::<i64>() {
        Variant::I64(n)
    } else if let Ok(x) = value.parse::<f64>() {
        Variant::F64(x)
    } else if let Ok(b) = value.parse::<bool>() {
        Variant::Bool(b)
    } else {
        Variant::from(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_messages_are_told_apart() {
        assert_eq!(parse("Hello"), None);
        assert_eq!(parse("/clear\nand more"), None);
        assert_eq!(parse(" /bye "), Some(Ok(Command::Bye)));
        assert_eq!(
            parse("/set temperature  0.5"),
            Some(Ok(Command::Set {
                key: "temperature",
                value: "0.5"
            }))
        );
        assert_eq!(parse("/set"), Some(Ok(Command::ShowOptions)));
        assert_eq!(
            parse("/system You are terse."),
            Some(Ok(Command::System(Some("You are terse."))))
        );
        assert_eq!(parse("/system"), Some(Ok(Command::System(None))));
        assert!(matches!(parse("/set seed"), Some(Err(_))));
        assert!(matches!(parse("/clear all"), Some(Err(_))));
        assert!(matches!(parse("/nope"), Some(Err(_))));
    }

    #[test]
    fn option_values_take_the_kind_they_read_as() {
        assert_eq!(option_value("max_tokens", "20"), Variant::U64(20));
        assert_eq!(option_value("seed", "-3"), Variant::I64(-3));
        assert_eq!(option_value("temperature", "0.7"), Variant::F64(0.7));
        assert_eq!(
            option_value("stop", "User:"),
            Variant::from(vec!["User:".to_owned()])
        );
        assert_eq!(option_value("model", "smollm2"), Variant::from("smollm2"));
    }
}
