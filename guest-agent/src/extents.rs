//! Coalescing page reports into extents: runs of consecutive frames that hold consecutive bytes
//! of one disk become one `(first frame, pages, disk, offset)` record, handed on in batches so
//! that a report of any size never sits in memory whole.

use crate::frames::PAGE_SIZE;

/// `pages` consecutive frames from `pfn` hold the bytes at `offset` of disk `disk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheExtent {
    /// First guest frame number.
    pub pfn: u64,
    /// Number of pages.
    pub pages: u64,
    /// Index of the disk in the scan's disk table.
    pub disk: u32,
    /// Byte offset on the whole disk.
    pub offset: u64,
}

/// Collects pages into extents and passes full batches to a sink.
pub struct Coalescer<F> {
    current: Option<CacheExtent>,
    batch: Vec<CacheExtent>,
    batch_size: usize,
    sink: F,
    /// Pages pushed so far.
    pub pages: u64,
}

impl<E, F: FnMut(Vec<CacheExtent>) -> Result<(), E>> Coalescer<F> {
    /// A coalescer that hands on batches of `batch_size` extents.
    pub fn new(batch_size: usize, sink: F) -> Self {
        Self {
            current: None,
            batch: Vec::with_capacity(batch_size),
            batch_size: batch_size.max(1),
            sink,
            pages: 0,
        }
    }

    /// Adds one page: frame `pfn` holds the page at byte `offset` of disk `disk`.
    pub fn push(&mut self, pfn: u64, disk: u32, offset: u64) -> Result<(), E> {
        self.pages += 1;
        if let Some(cur) = &mut self.current {
            let follows = cur.disk == disk
                && cur.pfn.checked_add(cur.pages) == Some(pfn)
                && cur.offset.checked_add(cur.pages * PAGE_SIZE) == Some(offset);
            if follows {
                cur.pages += 1;
                return Ok(());
            }
        }
        if let Some(done) = self.current.replace(CacheExtent {
            pfn,
            pages: 1,
            disk,
            offset,
        }) {
            self.batch.push(done);
            if self.batch.len() >= self.batch_size {
                let full = std::mem::replace(&mut self.batch, Vec::with_capacity(self.batch_size));
                (self.sink)(full)?;
            }
        }
        Ok(())
    }

    /// Hands on everything still held.
    pub fn finish(mut self) -> Result<u64, E> {
        if let Some(done) = self.current.take() {
            self.batch.push(done);
        }
        if !self.batch.is_empty() {
            let rest = std::mem::take(&mut self.batch);
            (self.sink)(rest)?;
        }
        Ok(self.pages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(pages: &[(u64, u32, u64)], batch: usize) -> (Vec<Vec<CacheExtent>>, u64) {
        let mut out = Vec::new();
        let mut c = Coalescer::new(batch, |b| {
            out.push(b);
            Ok::<(), ()>(())
        });
        for &(pfn, disk, offset) in pages {
            c.push(pfn, disk, offset).unwrap();
        }
        let n = c.finish().unwrap();
        (out, n)
    }

    #[test]
    fn consecutive_frames_on_consecutive_bytes_merge() {
        let (out, n) = collect(&[(10, 0, 0), (11, 0, 4096), (12, 0, 8192)], 8);
        assert_eq!(n, 3);
        assert_eq!(
            out,
            vec![vec![CacheExtent {
                pfn: 10,
                pages: 3,
                disk: 0,
                offset: 0
            }]]
        );
    }

    #[test]
    fn any_break_starts_a_new_extent() {
        let pages = [
            (10, 0, 0),
            (11, 0, 8192),  // bytes not consecutive
            (13, 0, 12288), // frame not consecutive
            (14, 1, 16384), // other disk
            (15, 1, 20480),
        ];
        let (out, _) = collect(&pages, 2);
        let all: Vec<_> = out.concat();
        assert_eq!(all.len(), 4);
        assert_eq!(
            all[3],
            CacheExtent {
                pfn: 14,
                pages: 2,
                disk: 1,
                offset: 16384
            }
        );
        assert!(out.iter().all(|b| b.len() <= 2), "batches are bounded");
    }
}
