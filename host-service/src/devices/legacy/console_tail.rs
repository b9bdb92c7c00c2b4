//! The last bytes the guest wrote to its serial console, kept in memory whatever the console's
//! destination (a file, stdout or nowhere), so that a VM that ends badly can say what its guest
//! printed last, and a reset that follows a kernel panic can be told from a reboot.
//!
//! The guest controls these bytes: the tail is bounded ([`TAIL_BYTES`]) and read back only as
//! lossy UTF-8 text.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

/// How many of the guest's last console bytes are kept.
pub const TAIL_BYTES: usize = 16 * 1024;

/// What Linux prints when it panics (before it resets with `panic=-1`, or halts).
pub const LINUX_PANIC: &str = "Kernel panic - not syncing";

/// The shared tail of a console; clones see the same bytes.
#[derive(Clone, Debug, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    /// Appends `data`, dropping the oldest bytes past [`TAIL_BYTES`].
    pub fn push(&self, data: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let data = &data[data.len().saturating_sub(TAIL_BYTES)..];
        let overflow = (tail.len() + data.len()).saturating_sub(TAIL_BYTES);
        tail.drain(..overflow);
        tail.extend(data);
    }

    /// The last `n` lines (the unfinished last line included), without carriage returns or
    /// control characters other than tabs.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let bytes: Vec<u8> = {
            let tail = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            tail.iter().copied().collect()
        };
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<String> = text
            .split('\n')
            .map(|l| {
                l.chars()
                    .filter(|c| !c.is_control() || *c == '\t')
                    .collect()
            })
            .collect();
        let end = match lines.last() {
            Some(last) if last.is_empty() => lines.len() - 1,
            _ => lines.len(),
        };
        lines[end.saturating_sub(n)..end].to_vec()
    }

    /// The line of the tail that reports a Linux kernel panic, if there is one.
    pub fn panic_line(&self) -> Option<String> {
        self.last_lines(usize::MAX)
            .into_iter()
            .rev()
            .find(|l| l.contains(LINUX_PANIC))
    }
}

/// A console writer that also keeps its tail.
pub struct TailWriter {
    inner: Box<dyn Write + Send>,
    tail: ConsoleTail,
}

impl TailWriter {
    /// Writes to `inner` and keeps the bytes in `tail`.
    pub fn new(inner: Box<dyn Write + Send>, tail: ConsoleTail) -> Self {
        Self { inner, tail }
    }
}

impl Write for TailWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.inner.write(buf) {
            Ok(n) => {
                self.tail.push(&buf[..n.min(buf.len())]);
                Ok(n)
            }
            Err(e) => {
                // The tail keeps what the guest sent even when the destination fails.
                self.tail.push(buf);
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes_and_lines() {
        let tail = ConsoleTail::default();
        assert!(tail.last_lines(5).is_empty());
        let mut w = TailWriter::new(Box::new(std::io::sink()), tail.clone());
        for i in 0..5000 {
            writeln!(w, "line {i}\r").expect("write");
        }
        write!(w, "unfinished").expect("write");
        assert_eq!(tail.last_lines(3), ["line 4998", "line 4999", "unfinished"]);
        let all = tail.last_lines(usize::MAX);
        let kept: usize = all.iter().map(|l| l.len() + 1).sum();
        assert!(kept <= TAIL_BYTES + 1, "{kept} bytes kept");
        assert!(all.len() > 1000 && all.len() < 5000);
        // A single write larger than the tail keeps its end.
        tail.push(&vec![b'x'; 3 * TAIL_BYTES]);
        assert_eq!(tail.last_lines(1)[0].len(), TAIL_BYTES);
    }

    #[test]
    fn finds_a_kernel_panic_and_strips_control_characters() {
        let tail = ConsoleTail::default();
        tail.push(b"[ 1.0] ok\n");
        assert_eq!(tail.panic_line(), None);
        tail.push(b"[ 2.0] Kernel panic - not syncing: Fatal exception\x1b[0m\n[ 2.1] reboot\n");
        assert_eq!(
            tail.panic_line().as_deref(),
            Some("[ 2.0] Kernel panic - not syncing: Fatal exception[0m")
        );
        // Invalid UTF-8 from the guest is replaced, never an error.
        tail.push(&[0xff, 0xfe, b'\n']);
        assert_eq!(tail.last_lines(1), ["\u{fffd}\u{fffd}"]);
    }
}
