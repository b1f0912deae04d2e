//! QMP input as QEMU's own parser takes it (qobject/json-streamer.c): a
//! stream of JSON values, not lines. An object may span several lines,
//! several may share one, and strings may be single-quoted (QEMU's extension
//! to JSON). [`JsonStreamer`] finds where each top-level value ends, so a
//! client can send one command at a time and await its reply, and hands the
//! value back as standard JSON.
//!
//! ```
//! use qemu_monitor::json::JsonStreamer;
//!
//! let mut s = JsonStreamer::new();
//! let mut done = Vec::new();
//! for b in b"{ 'execute':\n  'qmp_capabilities' }".iter() {
//!     done.extend(s.push(*b));
//! }
//! assert_eq!(done, vec![br#"{ "execute":
//!   "qmp_capabilities" }"#.to_vec()]);
//! ```

/// Finds the end of each top-level JSON object or array in a byte stream,
/// rewriting single-quoted strings as double-quoted ones.
#[derive(Debug, Default)]
pub struct JsonStreamer {
    /// The value so far, as standard JSON.
    text: Vec<u8>,
    /// Nesting of `{` and `[` outside strings.
    depth: usize,
    /// The quote that opened the string being read, if inside one.
    quote: Option<u8>,
    /// The previous byte was a backslash inside a string.
    escape: bool,
}

impl JsonStreamer {
    /// A streamer with nothing fed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether no value is under way (the next byte would start one).
    pub fn is_idle(&self) -> bool {
        self.text.is_empty()
    }

    /// The part of a value read so far, for an error message when the input
    /// ends inside it.
    pub fn pending(&self) -> &[u8] {
        &self.text
    }

    /// Drops a value under way.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Feeds one byte of a value that starts with `{` or `[`. Returns the
    /// whole value, as standard JSON, once its closing bracket is in.
    pub fn push(&mut self, b: u8) -> Option<Vec<u8>> {
        if let Some(quote) = self.quote {
            if self.escape {
                self.escape = false;
                // QEMU takes `\'` in either kind of string; JSON has no such escape.
                if b == b'\'' {
                    self.text.push(b'\'');
                } else {
                    self.text.extend_from_slice(&[b'\\', b]);
                }
            } else if b == b'\\' {
                self.escape = true;
            } else if b == quote {
                self.quote = None;
                self.text.push(b'"');
            } else if b == b'"' {
                // A double quote inside a single-quoted string.
                self.text.extend_from_slice(b"\\\"");
            } else {
                self.text.push(b);
            }
            return None;
        }
        match b {
            b'"' | b'\'' => {
                self.quote = Some(b);
                self.text.push(b'"');
            }
            b'{' | b'[' => {
                self.depth += 1;
                self.text.push(b);
            }
            b'}' | b']' => {
                self.text.push(b);
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 0 {
                    let value = std::mem::take(&mut self.text);
                    self.reset();
                    return Some(value);
                }
            }
            _ => self.text.push(b),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(input: &str) -> Vec<String> {
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        for b in input.bytes() {
            if s.is_idle() && b != b'{' && b != b'[' {
                continue;
            }
            if let Some(v) = s.push(b) {
                out.push(String::from_utf8(v).unwrap());
            }
        }
        out
    }

    #[test]
    fn splits_values_wherever_the_lines_break() {
        assert_eq!(
            values("{\"execute\":\"qmp_capabilities\"} {\"execute\":\"stop\"}\n"),
            [
                "{\"execute\":\"qmp_capabilities\"}",
                "{\"execute\":\"stop\"}"
            ]
        );
        let v = values("{\n  \"execute\": \"human-monitor-command\",\n  \"arguments\": {\"command-line\": \"info status\"}\n}\n");
        assert_eq!(v.len(), 1);
        let parsed: serde_json::Value = serde_json::from_str(&v[0]).unwrap();
        assert_eq!(parsed["arguments"]["command-line"], "info status");
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let v =
            values(r#"{"execute":"human-monitor-command","arguments":{"command-line":"echo }{"}}"#);
        assert_eq!(v.len(), 1);
        let parsed: serde_json::Value = serde_json::from_str(&v[0]).unwrap();
        assert_eq!(parsed["arguments"]["command-line"], "echo }{");
    }

    #[test]
    fn single_quoted_strings_become_json() {
        let v = values(
            r#"{'execute': 'human-monitor-command', 'arguments': {'command-line': 'echo "hi" it\'s'}}"#,
        );
        let parsed: serde_json::Value = serde_json::from_str(&v[0]).unwrap();
        assert_eq!(parsed["execute"], "human-monitor-command");
        assert_eq!(parsed["arguments"]["command-line"], "echo \"hi\" it's");
    }

    #[test]
    fn an_unfinished_value_stays_pending() {
        let mut s = JsonStreamer::new();
        for b in b"{\"execute\": \"st" {
            assert_eq!(s.push(*b), None);
        }
        assert!(!s.is_idle());
        assert_eq!(s.pending(), b"{\"execute\": \"st");
    }
}
