//! The hybrid-vsock handshake Firecracker introduced, so existing clients work: a host client
//! connects to the VMM's Unix socket, writes `CONNECT <port>\n`, and the VMM answers
//! `OK <host port>\n` once the guest accepted the connection (or closes the socket).
//!
//! The client is not trusted either: the line is bounded by [`MAX_LINE`], the port must be a
//! decimal `u32`, and bytes after the newline are the connection's first data, not part of the
//! handshake.

/// Longest accepted handshake line, newline included.
pub const MAX_LINE: usize = 32;

/// Why a handshake was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// No newline within [`MAX_LINE`] bytes.
    #[error("handshake line longer than {MAX_LINE} bytes")]
    TooLong,
    /// The line is not `CONNECT <port>`.
    #[error("malformed handshake line {0:?}")]
    Malformed(String),
}

/// Collects a client's handshake line across partial reads.
#[derive(Clone, Debug, Default)]
pub struct Handshake {
    line: Vec<u8>,
}

impl Handshake {
    /// Feeds bytes read from the client. Returns `Ok(None)` while the line is incomplete, or
    /// the requested guest port and how many bytes of `bytes` the line used (the rest is data).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<(u32, usize)>, HandshakeError> {
        let room = MAX_LINE - self.line.len();
        let window = &bytes[..bytes.len().min(room)];
        let Some(newline) = window.iter().position(|&b| b == b'\n') else {
            if bytes.len() >= room {
                return Err(HandshakeError::TooLong);
            }
            self.line.extend_from_slice(bytes);
            return Ok(None);
        };
        self.line.extend_from_slice(&window[..newline]);
        let text = String::from_utf8_lossy(&self.line);
        let port = text
            .strip_prefix("CONNECT ")
            .map(|p| p.strip_suffix('\r').unwrap_or(p))
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u32>().ok())
            .ok_or_else(|| HandshakeError::Malformed(text.clone().into_owned()))?;
        Ok(Some((port, newline + 1)))
    }
}

/// The reply that tells the client its connection is up, naming the host-side port.
pub fn ok_reply(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_in_pieces_with_trailing_data() {
        let mut h = Handshake::default();
        assert_eq!(h.push(b"CONN"), Ok(None));
        assert_eq!(h.push(b"ECT 52"), Ok(None));
        assert_eq!(h.push(b"\nhello"), Ok(Some((52, 1))));
        let mut h = Handshake::default();
        assert_eq!(
            h.push(b"CONNECT 4294967295\r\nxy"),
            Ok(Some((u32::MAX, 20)))
        );
        assert_eq!(ok_reply(1073741824), "OK 1073741824\n");
    }

    #[test]
    fn bad_lines_are_refused() {
        for line in [
            &b"CONNECT\n"[..],
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT 4294967296\n",
            b"CONNECT +5\n",
            b"connect 5\n",
            b"CONNECT 5 6\n",
            b"\xff\xfe\n",
        ] {
            assert!(
                matches!(
                    Handshake::default().push(line),
                    Err(HandshakeError::Malformed(_))
                ),
                "{line:?}"
            );
        }
        let mut h = Handshake::default();
        assert_eq!(h.push(&[b'1'; 20]), Ok(None));
        assert_eq!(h.push(&[b'1'; 12]), Err(HandshakeError::TooLong));
        let long = [b'9'; 100];
        assert_eq!(
            Handshake::default().push(&long),
            Err(HandshakeError::TooLong)
        );
    }

    proptest::proptest! {
        /// Any byte stream, cut anywhere, never panics and never accepts a line over the bound.
        #[test]
        fn arbitrary_input(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80), cut in 0usize..80) {
            let cut = cut.min(data.len());
            let mut h = Handshake::default();
            let first = h.push(&data[..cut]);
            if let Ok(Some((_, used))) = first {
                proptest::prop_assert!(used <= MAX_LINE);
            } else if first == Ok(None)
                && let Ok(Some((_, used))) = h.push(&data[cut..])
            {
                proptest::prop_assert!(cut + used <= MAX_LINE);
            }
        }
    }
}
