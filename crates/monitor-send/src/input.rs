//! The commands in a byte stream (standard input or an argument): human
//! monitor lines, and QMP JSON values wherever a line starts with `{`, taken
//! as QEMU's parser takes them (across lines, several on a line, single
//! quotes). A piece that cannot be a command is an item of its own, so it can
//! be reported while the others are still sent.

use std::collections::VecDeque;

use qemu_monitor::json::JsonStreamer;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A command line for the human monitor (or `human-monitor-command`).
    Line(String),
    /// One QMP message.
    Json { text: String, value: Value },
    /// Input that is no command, and why.
    Bad { text: String, reason: String },
}

#[derive(Debug, Default, PartialEq, Eq)]
enum State {
    /// At the start of a line, or between JSON values on one.
    #[default]
    Between,
    /// Inside a human monitor line.
    Line,
    /// Inside a JSON value.
    Json,
    /// After a JSON value, on the same line, something that is not one.
    Trailing,
}

/// Cuts input into [`Item`]s as bytes arrive.
#[derive(Debug, Default)]
pub struct Input {
    state: State,
    line: Vec<u8>,
    json: JsonStreamer,
    /// A JSON value ended on the current line.
    after_json: bool,
}

impl Input {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<Item>) {
        for &b in bytes {
            match self.state {
                State::Between => match b {
                    b'\n' => self.after_json = false,
                    b' ' | b'\t' | b'\r' => {}
                    b'{' | b'[' => {
                        self.state = State::Json;
                        self.json.push(b);
                    }
                    _ => {
                        // A line that goes on after a JSON value is no command.
                        self.state = if self.after_json {
                            State::Trailing
                        } else {
                            State::Line
                        };
                        self.line.push(b);
                    }
                },
                State::Line | State::Trailing => {
                    if b == b'\n' {
                        self.end_line(out);
                    } else {
                        self.line.push(b);
                    }
                }
                State::Json => {
                    if let Some(text) = self.json.push(b) {
                        out.push_back(json_item(text));
                        self.state = State::Between;
                        self.after_json = true;
                    }
                }
            }
        }
    }

    /// The end of the input: what is left is a last line, or an unfinished value.
    pub fn finish(&mut self, out: &mut VecDeque<Item>) {
        match self.state {
            State::Line | State::Trailing => self.end_line(out),
            State::Json => {
                let text = String::from_utf8_lossy(self.json.pending()).into_owned();
                out.push_back(Item::Bad {
                    text,
                    reason: "the input ended inside this JSON value".into(),
                });
                self.json.reset();
            }
            State::Between => {}
        }
        self.state = State::Between;
    }

    fn end_line(&mut self, out: &mut VecDeque<Item>) {
        let trailing = self.state == State::Trailing;
        self.state = State::Between;
        self.after_json = false;
        let mut raw = std::mem::take(&mut self.line);
        if raw.last() == Some(&b'\r') {
            raw.pop();
        }
        let item = match String::from_utf8(raw) {
            Err(e) => Item::Bad {
                text: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                reason: "it is not valid UTF-8".into(),
            },
            Ok(text) if trailing => Item::Bad {
                reason: "it follows a JSON value on the same line and is not JSON".into(),
                text,
            },
            Ok(text) if text.trim().is_empty() => return,
            Ok(text) => Item::Line(text),
        };
        out.push_back(item);
    }
}

fn json_item(text: Vec<u8>) -> Item {
    let text = String::from_utf8_lossy(&text).into_owned();
    match serde_json::from_str::<Value>(&text) {
        Ok(value) if value.is_object() => Item::Json { text, value },
        Ok(_) => Item::Bad {
            text,
            reason: "a QMP message must be a JSON object".into(),
        },
        Err(e) => Item::Bad {
            reason: format!("it is not valid JSON: {e}"),
            text,
        },
    }
}

/// All the items of a complete input.
pub fn items(bytes: &[u8]) -> VecDeque<Item> {
    let mut input = Input::new();
    let mut out = VecDeque::new();
    input.feed(bytes, &mut out);
    input.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(input: &str) -> Vec<String> {
        items(input.as_bytes())
            .into_iter()
            .map(|i| match i {
                Item::Line(l) => format!("line {l}"),
                Item::Json { value, .. } => format!("json {value}"),
                Item::Bad { text, .. } => format!("bad {text}"),
            })
            .collect()
    }

    #[test]
    fn lines_and_json_values() {
        assert_eq!(
            kinds("info status\r\n\n  stop\ncont"),
            ["line info status", "line stop", "line cont"]
        );
        assert_eq!(
            kinds("{\"execute\":\"qmp_capabilities\"} {\"execute\":\"stop\"}\ninfo status\n"),
            [
                r#"json {"execute":"qmp_capabilities"}"#,
                r#"json {"execute":"stop"}"#,
                "line info status"
            ]
        );
        assert_eq!(
            kinds("{\n  'execute': 'query-status'\n}\n"),
            [r#"json {"execute":"query-status"}"#]
        );
    }

    #[test]
    fn bad_pieces_are_items_too() {
        assert_eq!(
            kinds("{\"execute\":\"stop\"} garbage\ncont\n"),
            [r#"json {"execute":"stop"}"#, "bad garbage", "line cont"]
        );
        assert_eq!(kinds("[1]\n"), ["bad [1]"]);
        assert_eq!(kinds("{\"execute\": \"st"), ["bad {\"execute\": \"st"]);
        assert_eq!(kinds("{\"a\":,}\nstop\n"), ["bad {\"a\":,}", "line stop"]);
    }
}
