//! QEMU's telnet mode (`-monitor telnet:HOST:PORT,server`, `telnet=on`):
//! the server opens with option negotiation (`IAC WILL ECHO`, `IAC WILL
//! SUPPRESS-GO-AHEAD`, `IAC WILL BINARY`, `IAC DO BINARY`; chardev/char-socket.c,
//! `tcp_chr_telnet_init`) before the monitor's banner. A monitor speaks
//! UTF-8 text or JSON, where byte 0xFF never occurs, so the commands are
//! taken out of whatever arrives, on any socket; nothing needs answering.

/// Telnet's "interpret as command" byte.
const IAC: u8 = 0xFF;
/// Subnegotiation begin and end.
const SB: u8 = 250;
const SE: u8 = 240;
/// WILL, WONT, DO, DONT: each followed by one option byte.
const NEGOTIATE: std::ops::RangeInclusive<u8> = 251..=254;

/// Where the filter is inside a command, across reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Telnet {
    #[default]
    Data,
    Iac,
    Option,
    Sub,
    SubIac,
}

impl Telnet {
    /// Appends `input` to `out` without telnet's commands.
    pub(crate) fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if *self == Telnet::Data && !input.contains(&IAC) {
            out.extend_from_slice(input);
            return;
        }
        for &b in input {
            *self = match (*self, b) {
                (Telnet::Data, IAC) => Telnet::Iac,
                (Telnet::Data, b) => {
                    out.push(b);
                    Telnet::Data
                }
                // IAC IAC is a data byte 0xFF.
                (Telnet::Iac, IAC) => {
                    out.push(IAC);
                    Telnet::Data
                }
                (Telnet::Iac, SB) => Telnet::Sub,
                (Telnet::Iac, b) if NEGOTIATE.contains(&b) => Telnet::Option,
                (Telnet::Iac, _) | (Telnet::Option, _) => Telnet::Data,
                (Telnet::Sub, IAC) => Telnet::SubIac,
                (Telnet::Sub, _) => Telnet::Sub,
                (Telnet::SubIac, SE) => Telnet::Data,
                (Telnet::SubIac, _) => Telnet::Sub,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_opening_negotiation_is_taken_out_even_when_split() {
        let sent =
            b"\xff\xfb\x01\xff\xfb\x03\xff\xfb\x00\xff\xfd\x00QEMU 7.2.22 monitor\r\n(qemu) ";
        for cut in 0..sent.len() {
            let mut t = Telnet::default();
            let mut out = Vec::new();
            t.filter(&sent[..cut], &mut out);
            t.filter(&sent[cut..], &mut out);
            assert_eq!(out, b"QEMU 7.2.22 monitor\r\n(qemu) ", "cut at {cut}");
        }
    }

    #[test]
    fn subnegotiation_and_escaped_ff_are_handled() {
        let mut t = Telnet::default();
        let mut out = Vec::new();
        t.filter(b"a\xff\xfa\x18\x01\xff\xf0b\xff\xffc", &mut out);
        assert_eq!(out, b"ab\xffc");
    }
}
