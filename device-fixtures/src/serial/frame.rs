//! Request framing on the device side, with no I/O: bytes in, request lines out.

use serde::{Serialize, Serializer};

/// What ends a request line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RequestTerminator {
    /// CR, LF or CR LF, whichever comes: a lone CR ends a request at once, and the LF of a
    /// CR LF is taken as part of the same end.
    #[default]
    Any,
    /// CR only; an LF is an ordinary character.
    Cr,
    /// LF only, a CR just before it being dropped (a lone CR is an ordinary character).
    Lf,
}

impl RequestTerminator {
    /// From its wire name: `"any"`, `"\r"`, `"\n"`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "any" => Some(Self::Any),
            "\r" => Some(Self::Cr),
            "\n" => Some(Self::Lf),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Cr => "\r",
            Self::Lf => "\n",
        }
    }

    fn ends(self, byte: u8) -> bool {
        match self {
            Self::Any => byte == b'\r' || byte == b'\n',
            Self::Cr => byte == b'\r',
            Self::Lf => byte == b'\n',
        }
    }
}

impl Serialize for RequestTerminator {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Splits received bytes into request lines; drops a line longer than its limit.
#[derive(Debug)]
pub struct Framer {
    pending: Vec<u8>,
    /// The last byte seen ended a request with a CR (in `Any` mode).
    after_cr: bool,
    /// The current line grew past the limit: drop everything up to its terminator.
    discarding: bool,
    max_len: usize,
}

impl Framer {
    /// Lines hold at most `max_len` bytes before their terminator.
    pub fn new(max_len: usize) -> Self {
        Self {
            pending: Vec::new(),
            after_cr: false,
            discarding: false,
            max_len,
        }
    }

    /// Takes one read's bytes and returns the request lines they complete, without
    /// terminators.
    pub fn push(&mut self, bytes: &[u8], terminator: RequestTerminator) -> Vec<String> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let byte = bytes[i];
            i += 1;
            if std::mem::take(&mut self.after_cr) && byte == b'\n' {
                // The LF of a CR LF whose CR ended a request in an earlier read.
                continue;
            }
            if !terminator.ends(byte) {
                if !self.discarding {
                    self.pending.push(byte);
                    if self.pending.len() > self.max_len {
                        self.pending.clear();
                        self.discarding = true;
                    }
                }
                continue;
            }
            let mut raw = std::mem::take(&mut self.pending);
            raw.push(byte);
            if terminator == RequestTerminator::Any && byte == b'\r' {
                match bytes.get(i) {
                    Some(b'\n') => {
                        raw.push(b'\n');
                        i += 1;
                    }
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if std::mem::take(&mut self.discarding) {
                continue;
            }
            let text = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            out.push(text);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_terminator_takes_cr_lf_and_crlf() {
        let mut f = Framer::new(64);
        let any = RequestTerminator::Any;
        assert_eq!(f.push(b"TEMP?\r", any), ["TEMP?"]);
        // The LF of that CR LF comes in the next read: not a request.
        assert_eq!(f.push(b"\nSETP?\n", any), ["SETP?"]);
        assert_eq!(f.push(b"A\r\nB\rC", any), ["A", "B"]);
        assert_eq!(f.push(b"\r\n", any), ["C"]);
        // A lone LF after a plain line is an empty request, as before.
        assert_eq!(f.push(b"\n", any), [""]);
    }

    #[test]
    fn strict_terminators() {
        let mut f = Framer::new(64);
        assert_eq!(f.push(b"A\nB\r", RequestTerminator::Cr), ["A\nB"]);
        assert_eq!(f.push(b"C\rD\r\n", RequestTerminator::Lf), ["C\rD"]);
        assert!(f.push(b"E\r", RequestTerminator::Lf).is_empty());
    }

    #[test]
    fn overlong_lines_are_dropped_up_to_their_end() {
        let mut f = Framer::new(4);
        let any = RequestTerminator::Any;
        assert!(f.push(b"ABCDEFGH", any).is_empty());
        assert!(f.push(b"IJ", any).is_empty());
        assert_eq!(f.push(b"K\r\nOK\r", any), ["OK"]);
        assert_eq!(f.push(b"ABCD\n", any), ["ABCD"]);
    }
}
