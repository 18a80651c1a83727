//! `marengoctl chat`: the conversation is kept here and sent whole with every turn (the
//! service keeps no sessions; its prefix cache makes the resent part cheap).
//!
//! When the conversation outgrows the model's context, the service refuses it with
//! `ContextOverflow`; the oldest exchange is dropped and the rest sent again, until it fits or
//! only the new message is left. The service is the one that counts: it alone renders the
//! chat template, so a count made here would be a guess.

mod commands;
mod input;

use std::collections::HashMap;
use std::io::Write;

use marengo_client::{Llm1Error, Llm1Proxy};
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};

use crate::{CtlError, GenerationArgs, finish, follow, format_stats, show, subscribe};
use commands::Command;
use input::{Entry, Input};

/// The conversation: a system message, the exchanges that fit, and the request options.
struct Conversation {
    system: Option<String>,
    /// (user, assistant), oldest first.
    exchanges: Vec<(String, String)>,
    options: HashMap<String, OwnedVariant>,
}

impl Conversation {
    /// The messages of a request that adds `user` to the conversation.
    fn messages<'a>(&'a self, user: &'a str) -> Vec<(&'a str, &'a str)> {
        let mut messages = Vec::with_capacity(2 * self.exchanges.len() + 2);
        if let Some(system) = &self.system {
            messages.push(("system", system.as_str()));
        }
        for (question, answer) in &self.exchanges {
            messages.push(("user", question.as_str()));
            messages.push(("assistant", answer.as_str()));
        }
        messages.push(("user", user));
        messages
    }

    /// The options to send, with `extra` added or replaced.
    fn options_with<'a>(
        &'a self,
        extra: Option<(&'a str, &'a Variant<'a>)>,
    ) -> Result<HashMap<&'a str, Variant<'a>>, CtlError> {
        let mut options = HashMap::new();
        for (key, value) in &self.options {
            options.insert(key.as_str(), Variant::try_clone(value)?);
        }
        if let Some((key, value)) = extra {
            options.insert(key, value.try_clone()?);
        }
        Ok(options)
    }
}

pub async fn chat(
    connection: &Connection,
    proxy: &Llm1Proxy<'_>,
    system_prompt: Option<String>,
    args: &GenerationArgs,
    interactive: bool,
) -> Result<(), CtlError> {
    let mut options = HashMap::new();
    for (key, value) in args.options() {
        options.insert(key.to_owned(), value.try_to_owned()?);
    }
    let mut conversation = Conversation {
        system: system_prompt,
        exchanges: Vec::new(),
        options,
    };
    let mut signals = subscribe(connection).await?;
    let mut input = Input::new(interactive)?;
    loop {
        let text = match input.read().await? {
            Entry::Text(text) => text,
            Entry::Interrupted => {
                eprintln!("(Ctrl-D or /bye ends the chat)");
                continue;
            }
            Entry::End => return Ok(()),
        };
        if text.trim().is_empty() {
            continue;
        }
        match commands::parse(&text) {
            Some(Ok(command)) => {
                if !run_command(proxy, &mut conversation, command).await? {
                    return Ok(());
                }
            }
            Some(Err(message)) => eprintln!("{message}"),
            None => {
                let turn = Turn {
                    proxy,
                    signals: &mut signals,
                    args,
                    interactive,
                };
                turn.take(&mut conversation, text).await?;
            }
        }
    }
}

/// Runs a slash command; `false` when it ends the chat. Commands speak on stderr, so that
/// stdout holds the answers alone.
async fn run_command(
    proxy: &Llm1Proxy<'_>,
    conversation: &mut Conversation,
    command: Command<'_>,
) -> Result<bool, CtlError> {
    match command {
        Command::Bye => return Ok(false),
        Command::Set { key, value: text } => {
            let value = commands::option_value(key, text);
            match check_option(proxy, conversation, key, &value).await? {
                Ok(()) => {
                    eprintln!("set {key} to {text}");
                    conversation
                        .options
                        .insert(key.to_owned(), value.try_to_owned()?);
                }
                Err(refusal) => eprintln!("{refusal}"),
            }
        }
        Command::ShowOptions => {
            let mut options: Vec<_> = conversation.options.iter().collect();
            options.sort_by_key(|(key, _)| key.as_str());
            if options.is_empty() {
                eprintln!("no options set: the service's defaults apply");
            }
            for (key, value) in options {
                eprintln!("{key} {}", show(value));
            }
        }
        Command::System(system) => {
            conversation.system = system.map(str::to_owned);
            eprintln!(
                "{}",
                match system {
                    Some(_) => "system message set",
                    None => "system message removed",
                }
            );
        }
        Command::Clear => {
            conversation.exchanges.clear();
            eprintln!("conversation cleared");
        }
        Command::Help => eprintln!("{}", commands::HELP),
    }
    Ok(true)
}

/// Whether the service takes `key` = `value` with the other options, without generating: a
/// `Chat` with no messages checks its options, then refuses the empty conversation with
/// `InvalidArgument`. `Err` holds the service's `InvalidOption` message.
async fn check_option(
    proxy: &Llm1Proxy<'_>,
    conversation: &Conversation,
    key: &str,
    value: &Variant<'_>,
) -> Result<Result<(), String>, CtlError> {
    let options = conversation.options_with(Some((key, value)))?;
    match proxy.chat(&[], options).await {
        Err(Llm1Error::InvalidOption(message)) => Ok(Err(message)),
        Err(Llm1Error::InvalidArgument(_)) => Ok(Ok(())),
        Err(e) => Err(e.into()),
        Ok(path) => {
            // A service that runs empty chats: stop it, the options were taken.
            proxy.cancel(&path).await?;
            Ok(Ok(()))
        }
    }
}

/// One user turn: sent (made to fit), answered on stdout, kept if the answer is whole.
struct Turn<'a, 'p> {
    proxy: &'a Llm1Proxy<'p>,
    signals: &'a mut zbus::MessageStream,
    args: &'a GenerationArgs,
    interactive: bool,
}

impl Turn<'_, '_> {
    async fn take(self, conversation: &mut Conversation, user: String) -> Result<(), CtlError> {
        let path = match self.send(conversation, &user).await {
            Ok(path) => path,
            // On a terminal the user may rephrase or change the option; a script has no one
            // to read the message.
            Err(e @ (CtlError::Refused(_) | CtlError::ContextOverflow(_) | CtlError::Busy(_)))
                if self.interactive =>
            {
                eprintln!("marengoctl: {e}");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut answer = String::new();
        let mut stdout = std::io::stdout();
        let mut write = |text: &str| {
            answer.push_str(text);
            let _ = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush());
        };
        let (ending, interrupted) = follow(self.proxy, self.signals, &path, &mut write).await?;
        println!();
        if !self.interactive {
            println!();
        }
        if self.args.stats {
            eprintln!("{}", format_stats(&ending));
        }
        match ending.reason.as_str() {
            "stop" | "length" if !interrupted => conversation.exchanges.push((user, answer)),
            "error" => return finish(&ending, false, false),
            // A cut-off answer is not part of the conversation; the user may ask again.
            _ if self.interactive => eprintln!("({})", ending.reason),
            _ => return finish(&ending, false, interrupted),
        }
        Ok(())
    }

    /// Sends the conversation with `user` added, dropping its oldest exchanges while the
    /// service finds it too long for the context.
    async fn send(
        &self,
        conversation: &mut Conversation,
        user: &str,
    ) -> Result<OwnedObjectPath, CtlError> {
        let mut dropped = 0;
        let sent = loop {
            let options = conversation.options_with(None)?;
            match self.proxy.chat(&conversation.messages(user), options).await {
                Err(Llm1Error::ContextOverflow(_)) if !conversation.exchanges.is_empty() => {
                    conversation.exchanges.remove(0);
                    dropped += 1;
                }
                sent => break sent,
            }
        };
        if dropped > 0 {
            let what = match dropped {
                1 => "the oldest exchange".to_owned(),
                n => format!("the {n} oldest exchanges"),
            };
            eprintln!("(dropped {what}: the conversation outgrew the model's context)");
        }
        Ok(sent?)
    }
}
